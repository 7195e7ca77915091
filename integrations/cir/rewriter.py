"""Caption rewriting for training-free composed retrieval (the "reasoning" step of CIReVL).

CIReVL asks an LLM to turn (description of the reference image, modification text) into a
description of the target image. Two rewriters answer the same call
``rewriter(caption, modification) -> str``:

* ``RuleRewriter``: no model, for attribute edits in FashionIQ-style phrasing ("is red",
  "is blue and has a logo of Acme", "is made of wool", "is a skirt instead of a dress"). It parses
  the modification into ``Edit``s (colour, brand, fabric, subcategory), substitutes them into the
  caption, and keeps any clause it cannot parse as a trailing "that ..." phrase.
* ``LLMRewriter``: wraps any ``complete(prompt) -> str`` (an LLM client) with a few-shot prompt laid
  out like CIReVL's FashionIQ prompt (instruction; kinds of edit, each with an "Image Content: /
  Instruction: / Edited Description:" example; fashion examples; then the query) and reads back the
  "Edited Description:" line, falling back to the rule rewriter when the answer has none.

Any plain callable ``(caption, modification) -> str`` works wherever a rewriter is expected.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

Rewriter = Callable[[str, str], str]

ATTRIBUTES = ("colour", "brand", "fabric", "subcategory")

DEFAULT_COLOURS = (
    "black", "white", "off-white", "red", "blue", "navy", "green", "yellow", "orange", "pink",
    "purple", "violet", "grey", "gray", "brown", "beige", "cream", "ivory", "khaki", "olive",
    "burgundy", "maroon", "tan", "camel", "gold", "silver", "teal", "turquoise", "indigo",
    "charcoal", "multicolor", "multicolour", "lavender", "mint", "coral", "nude", "taupe", "ecru",
    "bordeaux", "fuchsia", "magenta", "mustard", "rust", "sand", "stone", "lilac", "peach",
)
COLOUR_SHADES = ("dark", "light", "pale", "bright", "deep", "dusty", "neon", "pastel")
DEFAULT_MATERIALS = (
    "cotton", "wool", "merino wool", "silk", "linen", "leather", "polyester", "nylon", "cashmere",
    "denim", "viscose", "elastane", "polyurethane", "spandex", "acrylic", "lambskin", "calfskin",
    "suede", "rayon", "modal", "alpaca", "mohair", "polyamide", "lyocell", "cupro", "acetate",
    "jersey", "fleece", "velvet", "satin", "tweed", "corduroy", "canvas", "shearling", "fur",
    "lycra", "hemp", "angora", "chiffon", "lace", "knit", "mesh", "sequin", "neoprene",
)
DEFAULT_GARMENTS = (
    "dress", "shirt", "t-shirt", "tee", "top", "tank top", "blouse", "sweater", "sweatshirt",
    "hoodie", "jacket", "coat", "blazer", "jeans", "pants", "trousers", "shorts", "skirt",
    "jumpsuit", "cardigan", "vest", "polo", "suit", "parka", "bomber", "gown", "tunic", "romper",
    "sneakers", "boots", "sandals", "loafers", "heels", "bag", "tote", "backpack", "hat", "cap",
    "scarf", "belt", "jeans", "leggings", "overcoat", "trench coat", "bodysuit", "camisole",
)
# Words that turn the value after them into the *old* value ("is red instead of black").
_NEGATIONS = r"(?:instead of|rather than|not|no longer|unlike|in place of)"
_STOP = r"(?=\s+(?:and|but|with|instead|rather|not|in place)\b|[,;.!?]|$)"
_PART = r"\d+(?:\.\d+)?\s*%\s*[a-z][a-z\-]*"  # one part of a composition: "96% cotton"
_FILLER = {
    "is", "are", "be", "has", "have", "a", "an", "the", "it", "its", "it's", "and", "with", "more",
    "of", "in", "color", "colour", "colored", "coloured", "made", "from", "fabric", "material",
    "instead", "rather", "than", "not", "logo", "brand", "by", "that", "this", "one", "product",
}


@dataclass(frozen=True)
class Edit:
    """One parsed attribute change: the target has ``attribute`` = ``value`` (was ``old``)."""
    attribute: str
    value: str
    old: Optional[str] = None


def _alternation(words: Iterable[str]) -> str:
    # Longest first so "merino wool" wins over "wool" and "off-white" over "white".
    words = sorted({w.lower() for w in words if w}, key=len, reverse=True)
    return "|".join(re.escape(w) for w in words)


def _plural_suffix(word: str) -> str:
    """Regex suffix that also accepts the plural ("dress" -> "dresses"); none for "jeans"."""
    return r"(?:es|s)?" if not word.endswith("s") else ""


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def singular(word: str) -> str:
    """Readable singular of a catalogue sub-category ("SWEATERS" -> "sweater", "JEANS" -> "jeans")."""
    w = word.strip().lower()
    if w in {"jeans", "pants", "trousers", "shorts", "leggings", "sneakers", "boots", "sandals",
             "loafers", "heels", "glasses", "sunglasses", "briefs", "boxers", "socks", "tights"}:
        return w
    if re.search(r"(ss|sh|ch|x)es$", w):
        return w[:-2]
    if w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def main_material(composition: str) -> str:
    """The dominant material of a composition string ("96% cotton, 4% elastane" -> "cotton")."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*%\s*([a-z][a-z \-]*)", composition.lower())
    if parts:
        return max(parts, key=lambda p: float(p[0]))[1].strip()
    return composition.strip().lower()


@dataclass
class RuleRewriter:
    """Attribute-edit rewriter driven by vocabularies (extend them with a catalogue's own values).

    ``brands`` are matched case-insensitively in both texts so a caption's old brand can be swapped
    out; other brands are still recognised in the modification by phrasing ("by X", "logo of X").
    """
    colours: tuple[str, ...] = DEFAULT_COLOURS
    materials: tuple[str, ...] = DEFAULT_MATERIALS
    garments: tuple[str, ...] = DEFAULT_GARMENTS
    brands: tuple[str, ...] = ()
    _res: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        shade = f"(?:(?:{'|'.join(COLOUR_SHADES)})[\\s-]+)?"
        garments = sorted({g.lower() for g in self.garments}, key=len, reverse=True)
        garment_alt = "|".join(re.escape(g) + _plural_suffix(g) for g in garments)
        self._res = {
            "colour": re.compile(rf"\b{shade}(?:{_alternation(self.colours)})\b", re.I),
            # a full composition ("96% cotton, 4% elastane") or a single material word
            "composition": re.compile(rf"{_PART}(?:\s*,?\s*{_PART})*", re.I),
            "material": re.compile(rf"\b(?:{_alternation(self.materials)})\b", re.I),
            "garment": re.compile(rf"\b(?:{garment_alt})\b", re.I),
            "brand": re.compile(rf"(?<!\w)(?:{_alternation(self.brands)})(?!\w)", re.I) if self.brands else None,
            "brand_phrase": re.compile(
                rf"(?:\blogo\s+(?:of|from|for|reading|saying)|\b(?:is|made|designed)\s+by|"
                rf"\b(?:is\s+)?from\s+the\s+brand|\bis\s+from|\bbrand(?:ed)?(?:\s+is)?)\s+(?P<v>.+?){_STOP}", re.I),
            "negated": re.compile(rf"\b{_NEGATIONS}\s+(?:a\s+|an\s+|the\s+)?(?P<v>.+?){_STOP}", re.I),
        }

    # -- vocabularies -----------------------------------------------------------------------------
    @classmethod
    def from_vocab(cls, vocab: dict | str | Path) -> "RuleRewriter":
        """Build from a vocabulary dict or JSON file with optional keys colours, materials, garments,
        brands (the synthetic builder writes one next to its data)."""
        if not isinstance(vocab, dict):
            path = Path(vocab)
            if not path.is_file():
                raise FileNotFoundError(f"rewriter vocabulary not found: {path}")
            vocab = json.loads(path.read_text())
        return cls(colours=tuple(dict.fromkeys([*DEFAULT_COLOURS, *vocab.get("colours", ())])),
                   materials=tuple(dict.fromkeys([*DEFAULT_MATERIALS, *vocab.get("materials", ())])),
                   garments=tuple(dict.fromkeys([*DEFAULT_GARMENTS, *vocab.get("garments", ())])),
                   brands=tuple(vocab.get("brands", ())))

    # -- parsing ------------------------------------------------------------------------------------
    def parse(self, modification: str) -> tuple[list[Edit], list[str]]:
        """Modification text -> (attribute edits, clauses that name no known attribute)."""
        edits: dict[str, Edit] = {}
        leftovers: list[str] = []
        for clause in self._clauses(modification):
            found = self._parse_clause(clause)
            for e in found:
                edits.setdefault(e.attribute, e)  # the first mention of an attribute wins
            if not found and self._has_content(clause):
                leftovers.append(clause)
        return list(edits.values()), leftovers

    def _clauses(self, text: str) -> list[str]:
        # Protect spans that contain separators ("96% cotton, 4% elastane", "Dolce and Gabbana").
        protected: list[str] = []

        def keep(m: re.Match) -> str:
            protected.append(m.group(0))
            return f"\x00{len(protected) - 1}\x00"

        text = self._res["composition"].sub(keep, text.strip())
        if self._res["brand"] is not None:
            text = self._res["brand"].sub(keep, text)
        parts = re.split(r"\s*(?:[,;.!?]|\band\b|\bbut\b|\balso\b)\s*", text)
        restore = lambda s: re.sub(r"\x00(\d+)\x00", lambda m: protected[int(m.group(1))], s)  # noqa: E731
        return [restore(p).strip() for p in parts if p.strip()]

    def _parse_clause(self, clause: str) -> list[Edit]:
        res = self._res
        old_spans, olds = [], []
        for m in res["negated"].finditer(clause):
            old_spans.append(m.span("v"))
            olds.append(m.group("v").strip())

        def fresh(m: re.Match, group: int | str = 0) -> bool:
            s, e = m.span(group)
            return not any(a <= s < b or a < e <= b for a, b in old_spans)

        def first_fresh(regex) -> Optional[re.Match]:
            return next((m for m in regex.finditer(clause) if fresh(m)), None) if regex else None

        def old_value(regex) -> Optional[str]:
            for old in olds:
                m = regex.search(old) if regex is not None else None
                if m:
                    return m.group(0)
            return None

        edits: list[Edit] = []
        brand = first_fresh(res["brand"])
        phrase = next((m for m in res["brand_phrase"].finditer(clause) if fresh(m, "v")), None)
        if brand is not None:
            edits.append(Edit("brand", brand.group(0), old_value(res["brand"])))
        elif phrase is not None and not res["colour"].fullmatch(phrase.group("v").strip()):
            edits.append(Edit("brand", phrase.group("v").strip(), olds[0] if olds else None))
        brand_span = (brand or phrase).span() if (brand or phrase) else (0, 0)

        def outside_brand(m: Optional[re.Match]) -> Optional[re.Match]:
            return None if m is None or brand_span[0] <= m.start() < brand_span[1] else m

        colour = outside_brand(first_fresh(res["colour"]))
        if colour is not None:
            edits.append(Edit("colour", colour.group(0).lower(), old_value(res["colour"])))
        fabric = outside_brand(first_fresh(res["composition"]) or first_fresh(res["material"]))
        if fabric is not None:
            edits.append(Edit("fabric", fabric.group(0).lower(),
                              old_value(res["composition"]) or old_value(res["material"])))
        garment = outside_brand(first_fresh(res["garment"]))
        if garment is not None:
            edits.append(Edit("subcategory", garment.group(0).lower(), old_value(res["garment"])))
        return edits

    @staticmethod
    def _has_content(clause: str) -> bool:
        return any(w not in _FILLER for w in re.findall(r"[\w'-]+", clause.lower()))

    # -- applying -----------------------------------------------------------------------------------
    def apply(self, caption: str, edits: Iterable[Edit], leftovers: Iterable[str] = ()) -> str:
        text = caption.strip().rstrip(".")
        for edit in edits:
            text = getattr(self, f"_apply_{edit.attribute}")(text, edit)
        leftovers = [c.strip() for c in leftovers]
        if leftovers:
            text = f"{text} that {' and '.join(leftovers)}"
        return _fix_articles(re.sub(r"\s+", " ", text)).strip()

    @staticmethod
    def _replace_or(text: str, regex, value: str, fallback: Callable[[str], str], count: int = 1) -> str:
        # Only the first mention by default: a caption's first colour / garment is its main one.
        new, n = regex.subn(lambda _: value, text, count=count) if regex is not None else (text, 0)
        return new if n else fallback(text)

    def _apply_colour(self, text: str, edit: Edit) -> str:
        def insert(t: str) -> str:
            m = re.match(r"(?i)(a|an|the)\s+", t)
            return f"{t[:m.end()]}{edit.value} {t[m.end():]}" if m else f"{edit.value} {t}"
        return self._replace_or(text, self._res["colour"], edit.value, insert)

    def _apply_fabric(self, text: str, edit: Edit) -> str:
        # A caption may name the fabric twice ("cotton shirt. 96% cotton, 4% elastane"): swap the
        # full composition for the new value and the first lone material word for its main material.
        spans = []
        comp = self._res["composition"].search(text)
        if comp:
            spans.append((comp.span(), edit.value))
        lone = next((m for m in self._res["material"].finditer(text)
                     if not (comp and comp.start() <= m.start() < comp.end())), None)
        if lone:
            spans.append((lone.span(), main_material(edit.value)))
        if not spans:
            return f"{text} made of {edit.value}"
        for (start, end), value in sorted(spans, reverse=True):
            text = text[:start] + value + text[end:]
        return text

    def _apply_subcategory(self, text: str, edit: Edit) -> str:
        return self._replace_or(text, self._res["garment"], edit.value,
                                lambda t: f"{t}, {_article(edit.value)} {edit.value}")

    def _apply_brand(self, text: str, edit: Edit) -> str:
        known = self._res["brand"]
        if edit.old:
            old = re.compile(rf"(?<!\w){re.escape(edit.old)}(?!\w)", re.I)
            known = old if known is None else re.compile(f"{old.pattern}|{known.pattern}", re.I)
        return self._replace_or(text, known, edit.value, lambda t: f"{t} by {edit.value}", count=0)

    def __call__(self, caption: str, modification: str) -> str:
        edits, leftovers = self.parse(modification)
        return self.apply(caption, edits, leftovers)


def _fix_articles(text: str) -> str:
    """"a orange" -> "an orange", "an red" -> "a red" after substitutions (capital A kept)."""
    def fix(m: re.Match) -> str:
        article = m.group(1)[0] + ("n" if m.group(2).lower() in "aeiou" else "")
        return f"{article} {m.group(2)}"
    return re.sub(r"\b(a|an|A|An)\s+(\w)", fix, text)


# -- LLM hook ---------------------------------------------------------------------------------------
# The default prompt follows the layout of CIReVL's FashionIQ prompt (its prompts.py,
# structural_modifier_prompt_fashion): an instruction naming the three labelled fields, kinds of edit
# each shown by one worked example, rules (short, nothing invented, one answer), then fashion
# examples in FashionIQ's terse caption style; the query's two lines are appended after a newline.
# The wording and every example are this project's own.
FASHION_FEW_SHOT_PROMPT = """\
You help search a fashion catalogue. I describe a garment in a photo and give an instruction that says
how the garment I want differs from it. Write a description of the garment I want. My description
starts with "Image Content:", my instruction starts with "Instruction:", and your answer must start
with "Edited Description:". The answer should be a complete description and may need any of these
kinds of change; one example of each:

"colour"
Image Content: a navy wool coat with a belt
Instruction: make it camel coloured
Edited Description: a camel wool coat with a belt

"addition"
Image Content: a plain white cotton t-shirt
Instruction: add a small logo on the chest
Edited Description: a white cotton t-shirt with a small logo on the chest

"removal"
Image Content: a denim jacket with a fur collar
Instruction: without the collar
Edited Description: a denim jacket without a collar

"material"
Image Content: a black leather skirt
Instruction: is knitted instead
Edited Description: a black knitted skirt

"garment type"
Image Content: a floral print summer dress
Instruction: a blouse with the same print
Edited Description: a floral print summer blouse

"comparative"
Image Content: a knee length grey skirt
Instruction: is shorter and darker
Edited Description: a short dark grey skirt

"several changes"
Image Content: a red hoodie with a front pocket
Instruction: is green and has no hood
Edited Description: a green sweatshirt with a front pocket

"no change"
Image Content: a beige trench coat
Instruction: looks the same
Edited Description: a beige trench coat

Keep the edited description as short and plain as you can. Keep what the instruction does not change,
do not invent details, and answer with one edited description only. The instruction does not say
which kind of change it is. More examples in the style of the captions you will see:

Image Content: the woman is wearing a pale blue shirt dress
Instruction: is sleeveless and is darker blue
Edited Description: the woman is wearing a sleeveless dark blue shirt dress

Image Content: a grey t-shirt with a band name printed on it
Instruction: has a different band and is white
Edited Description: a white t-shirt with a different band name printed on it

Image Content: the man is wearing a checked flannel shirt
Instruction: is solid black and more formal
Edited Description: the man is wearing a formal solid black shirt

Image Content: a long sleeved striped top
Instruction: has short sleeves and no stripes
Edited Description: a plain top with short sleeves

Image Content: a yellow polka dot dress with thin straps
Instruction: is longer and has a pattern of flowers
Edited Description: a long yellow dress with a flower pattern and thin straps
"""
QUERY_LINES = "\nImage Content: {caption}\nInstruction: {modification}\n"
# The project's earlier short instruction prompt, kept as an option (``LLMRewriter(prompt=SHORT_PROMPT)``).
SHORT_PROMPT = (
    "You edit product descriptions for fashion image search.\n"
    "Given the description of a reference garment and an instruction saying how the wanted garment "
    "differs from it, write one short description of the wanted garment. Keep everything the "
    "instruction does not change; change exactly what it asks (colour, brand or logo, fabric, "
    "garment type, or any other detail).\n"
    "Answer with one line that starts with 'Edited Description:'.\n\n"
    "Image Content: {caption}\nInstruction: {modification}\n"
)
LLM_PROMPT = FASHION_FEW_SHOT_PROMPT.replace("{", "{{").replace("}", "}}") + QUERY_LINES  # the default
ANSWER_LABEL = "Edited Description:"


class UnusableAnswerError(ValueError):
    """The LLM's answer has no non-empty "Edited Description:" line."""


def parse_edited_description(answer: str, label: str = ANSWER_LABEL) -> str:
    """The target description from an LLM answer: the text after ``label`` on the first line that
    starts with it (case and surrounding spaces ignored), as the prompt asks. Raises
    ``UnusableAnswerError`` when no such line holds any text."""
    for line in (answer or "").splitlines():
        line = line.strip()
        if line.lower().startswith(label.lower()):
            text = line[len(label):].strip()
            if text:
                return text
    shown = (answer or "").strip().replace("\n", " | ")
    shown = shown[:120] + ("..." if len(shown) > 120 else "")
    raise UnusableAnswerError(f"the LLM answer has no line starting with {label!r} followed by a description "
                              f"(got {shown!r}); the prompt must ask for that format, or give LLMRewriter a "
                              "fallback rewriter")


def modification_as_description(caption: str, modification: str) -> str:
    """CIReVL's own fallback when the answer is unusable: search with the instruction text itself."""
    return modification


@dataclass
class LLMRewriter:
    """Rewrite with any text-completion callable (an LLM client), CIReVL style.

    ``complete(prompt) -> str`` gets ``prompt`` (default: the few-shot fashion prompt, laid out like
    CIReVL's FashionIQ prompt) filled with the caption and the modification; the answer's first
    "Edited Description:" line is the target description (``parse_edited_description``).

    When the call fails or the answer has no usable line, ``fallback(caption, modification)`` answers:
    by default the ``RuleRewriter`` (a kept difference: CIReVL searches with the bare instruction
    then, which is ``fallback=modification_as_description``); ``fallback=None`` raises instead.
    """
    complete: Callable[[str], str]
    prompt: str = LLM_PROMPT
    fallback: Optional[Rewriter] = field(default_factory=RuleRewriter)

    def __post_init__(self):
        for name in ("{caption}", "{modification}"):
            if name not in self.prompt:
                raise ValueError(f"the rewriter prompt must contain {name}; it is filled with the query's "
                                 "reference description and modification")

    def build_prompt(self, caption: str, modification: str) -> str:
        return self.prompt.format(caption=caption, modification=modification)

    def __call__(self, caption: str, modification: str) -> str:
        try:
            return parse_edited_description(self.complete(self.build_prompt(caption, modification)))
        except Exception:
            if self.fallback is None:
                raise
            return self.fallback(caption, modification)


def as_rewriter(rewriter: Rewriter | None) -> Rewriter:
    """None -> the default ``RuleRewriter``; any callable(caption, modification) -> itself."""
    if rewriter is None:
        return RuleRewriter()
    if not callable(rewriter):
        raise TypeError(f"a rewriter must be callable(caption, modification) -> str, got {type(rewriter).__name__}")
    return rewriter
