"""Caption rewriting for CIReVL: the rule rewriter on known edits, and the LLM / callable hooks."""
import re

import pytest

from integrations.cir.rewriter import (LLM_PROMPT, SHORT_PROMPT, Edit, LLMRewriter, RuleRewriter, UnusableAnswerError,
                                      as_rewriter, main_material, modification_as_description,
                                      parse_edited_description, singular)

BRANDS = ("Acme", "Dolce and Gabbana", "Tamsin Grey")


@pytest.fixture(scope="module")
def rw():
    return RuleRewriter(brands=BRANDS)


@pytest.mark.parametrize("caption, modification, expected", [
    ("a black wool sweater by Acme", "is red", "a red wool sweater by Acme"),
    ("a black wool sweater by Acme", "is blue and has a logo of Zorro", "a blue wool sweater by Zorro"),
    ("a black wool sweater by Acme", "is made of silk", "a black silk sweater by Acme"),
    ("a black wool sweater", "is a skirt instead of a sweater", "a black wool skirt"),
    ("a black jacket", "is red instead of black, and is an overcoat", "a red overcoat"),
    ("a white dress by Acme", "is by Dolce and Gabbana", "a white dress by Dolce and Gabbana"),
    ("a white dress", "is more colorful and has longer sleeves",
     "a white dress that is more colorful and has longer sleeves"),            # unparsed clauses are kept
    ("Black Stretch cotton Shirt by Acme, 96% cotton, 4% polyurethane", "is made of 100% wool",
     "Black Stretch wool Shirt by Acme, 100% wool"),
    ("a shirt", "is dark blue", "a dark blue shirt"),                       # no colour yet: inserted
    ("a navy dress", "is by Tamsin Grey", "a navy dress by Tamsin Grey"),   # a brand containing a colour word
    ("a black top", "is an orange", "an orange top"),                      # article follows the new word
    ("a red coat by Acme", "is from the brand Zorro Lab", "a red coat by Zorro Lab"),
    ("a red coat", "the brand is Zorro", "a red coat by Zorro"),
])
def test_rule_rewriter_known_edits(rw, caption, modification, expected):
    assert rw(caption, modification) == expected


def test_parse_reports_new_and_old_values(rw):
    edits, leftovers = rw.parse("is red instead of black and has a logo of Acme")
    assert Edit("colour", "red", "black") in edits
    assert any(e.attribute == "brand" and e.value == "Acme" for e in edits)
    assert leftovers == []
    edits, leftovers = rw.parse("is made of 96% cotton, 4% elastane")
    assert edits == [Edit("fabric", "96% cotton, 4% elastane")]


def test_vocabulary_extension(tmp_path):
    path = tmp_path / "vocab.json"
    path.write_text('{"colours": ["chartreuse"], "brands": ["Ostra"], "garments": ["kaftan"]}')
    rw = RuleRewriter.from_vocab(path)
    assert rw("a red kaftan by Vetrano", "is chartreuse") == "a chartreuse kaftan by Vetrano"
    assert rw("a red kaftan by Ostra", "is from Vetrano") == "a red kaftan by Vetrano"
    with pytest.raises(FileNotFoundError):
        RuleRewriter.from_vocab(tmp_path / "missing.json")


def test_llm_rewriter_reads_answer_and_falls_back():
    prompts = []

    def complete(prompt):
        prompts.append(prompt)
        return "Sure.\nEdited Description: a red silk dress\n"
    assert LLMRewriter(complete)("a black silk dress", "is red") == "a red silk dress"
    assert "Image Content: a black silk dress" in prompts[0] and "Instruction: is red" in prompts[0]

    def broken(prompt):
        raise RuntimeError("network down")
    assert LLMRewriter(broken)("a black silk dress", "is red") == "a red silk dress"  # rule fallback


def test_default_prompt_is_cirevl_style_few_shot_with_the_query_last():
    prompts = []

    def complete(prompt):
        prompts.append(prompt)
        return "Edited Description: a red silk dress"
    LLMRewriter(complete)("a black silk dress with {braces}", "is red and longer")
    prompt = prompts[0]
    assert LLMRewriter(complete).prompt == LLM_PROMPT
    # Instruction first, naming the three labelled fields and the answer format.
    head = prompt[:prompt.index("Image Content: ")]
    assert all(label in head for label in ('"Image Content:"', '"Instruction:"', '"Edited Description:"'))
    # Worked examples: each an Image Content / Instruction / Edited Description triple.
    examples = re.findall(r"Image Content: .+\nInstruction: .+\nEdited Description: .+", prompt)
    assert len(examples) >= 10
    # The query comes last, in the examples' layout, with no answer filled in.
    assert prompt.rstrip("\n").endswith("Image Content: a black silk dress with {braces}\nInstruction: is red and longer")
    assert prompt.count("Edited Description: ") == len(examples)


def test_answer_parser_reads_the_edited_description_line():
    assert parse_edited_description("Sure!\n  edited description:  a green coat \nmore") == "a green coat"
    # Text after the label is kept whole, colons included (CIReVL's split(':')[1] would cut it).
    assert parse_edited_description("Edited Description: a t-shirt reading: hello") == "a t-shirt reading: hello"
    # An empty labelled line is skipped for a later one with text.
    assert parse_edited_description("Edited Description:\nEdited Description: a coat") == "a coat"
    for answer in ("a green coat", "", "Edited Description:   ", "Description: a coat"):
        with pytest.raises(UnusableAnswerError, match="Edited Description"):
            parse_edited_description(answer)


def test_unusable_answers_fall_back_or_raise():
    chatty = lambda prompt: "I think the target is a red silk dress."  # noqa: E731  no labelled line
    assert LLMRewriter(chatty)("a black silk dress", "is red") == "a red silk dress"  # rule fallback
    assert LLMRewriter(chatty, fallback=modification_as_description)("a black silk dress", "is red") == "is red"
    with pytest.raises(UnusableAnswerError, match="no line starting with 'Edited Description:'"):
        LLMRewriter(chatty, fallback=None)("a black silk dress", "is red")
    short = LLMRewriter(lambda p: "Edited Description: a red dress", prompt=SHORT_PROMPT)
    assert short("a black dress", "is red") == "a red dress"
    assert "Image Content: a black dress" in short.build_prompt("a black dress", "is red")
    with pytest.raises(ValueError, match="modification"):
        LLMRewriter(chatty, prompt="Describe {caption}")


def test_any_callable_is_a_rewriter():
    fn = lambda caption, modification: f"{caption} | {modification}"  # noqa: E731
    assert as_rewriter(fn)("a", "b") == "a | b"
    assert isinstance(as_rewriter(None), RuleRewriter)
    with pytest.raises(TypeError):
        as_rewriter("not callable")


def test_helpers():
    assert main_material("96% cotton, 4% polyurethane") == "cotton"
    assert main_material("30% wool, 70% polyamide") == "polyamide"
    assert singular("SWEATERS") == "sweater" and singular("DRESSES") == "dress" and singular("JEANS") == "jeans"
