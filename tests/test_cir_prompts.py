"""The Pic2Word shim builds its prompts as Pic2Word's public code does; SEARLE's stay one option away."""
import json

import pytest
import torch

from e2_adapter.zoo import create_clip
from integrations.cir.fashioniq import Triplet
from integrations.cir.pic2word import (PROMPT_STYLES, MapperConfig, Pic2Word, PseudoWordMapper, query_modification)
from integrations.cir.text_injection import encode_text_with_pseudo_tokens, placeholder_token_id, token_width

START, END = 49406, 49407  # CLIP BPE start / end of text


@pytest.fixture(scope="module")
def openai_tiny():
    b = create_clip("openai", "tiny", seed=0)  # clip.model.CLIP: Pic2Word's own model class
    b.model.eval()
    return b


def pic2word_training_ids(tokenizer):
    """Pic2Word's trainer: tokenize("a photo of") and insert the image token before the end token
    (``encode_text_img``: cat(x[:, :end], img, x[:, end:-1])), at the level of token ids."""
    ids = tokenizer(["a photo of"])[0].tolist()
    end = ids.index(END)
    return ids[:end] + ["IMG"] + ids[end:-1], end


def pic2word_encode_text_img(model, pseudo):
    """Pic2Word's ``CLIP.encode_text_img`` re-declared from its published code (not copied)."""
    from clip import tokenize
    text = tokenize(["a photo of"], context_length=model.context_length).repeat(len(pseudo), 1)
    x = model.token_embedding(text)
    end = int((text[0] == END).nonzero()[0])
    x = torch.cat([x[:, :end], pseudo[:, None], x[:, end:-1]], dim=1) + model.positional_embedding
    x = model.ln_final(model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
    return x[:, end + 1] @ model.text_projection  # the end token moved one place right


def test_default_training_prompt_has_pic2word_ids(openai_tiny):
    tok = openai_tiny.tokenizer
    cfg = MapperConfig(input_dim=64, output_dim=token_width(openai_tiny.model))
    assert (cfg.placeholder, cfg.caption_join) == ("*", "pic2word")
    pid = placeholder_token_id(tok, cfg.placeholder)
    assert pid == 265 == int(tok(["*"])[0][1])  # Pic2Word's id_split = tokenize(["*"])[0][1]
    expected, at = pic2word_training_ids(tok)
    ours = tok([cfg.train_prompt])[0].tolist()
    assert ours[:len(expected)] == [pid if i == "IMG" else i for i in expected]
    assert ours[at] == pid and ours[0] == START and ours[at + 1] == END
    assert not any(ours[at + 2:])  # padding after the end token, as Pic2Word's shifted sequence has


@torch.no_grad()
def test_default_training_prompt_encodes_like_pic2word(openai_tiny):
    model, tok = openai_tiny.model, openai_tiny.tokenizer
    cfg = MapperConfig(input_dim=64, output_dim=token_width(model))
    pseudo = torch.randn(3, token_width(model), generator=torch.Generator().manual_seed(0))
    ours = encode_text_with_pseudo_tokens(model, tok([cfg.train_prompt] * 3), pseudo,
                                          placeholder_token_id(tok, cfg.placeholder))
    theirs = pic2word_encode_text_img(model, pseudo)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # SEARLE's training prompt has the same words; only its placeholder token ("$") differs, and the
    # pseudo-word replaces it, so both styles train on the same text embedding.
    searle = MapperConfig.for_style("searle", 64, token_width(model))
    other = encode_text_with_pseudo_tokens(model, tok([searle.train_prompt] * 3), pseudo,
                                           placeholder_token_id(tok, searle.placeholder))
    assert torch.allclose(other, theirs, atol=1e-5)
    assert tok([searle.train_prompt])[0][4] == 259 != tok([cfg.train_prompt])[0][4]


def test_default_fashioniq_query_is_pic2words():
    captions = ("is red and shorter.", "has a logo?")
    cfg = MapperConfig(64, 64)
    # Pic2Word's FashionIQ dataset: 'a photo of * , {} and {}'.format(cap2, cap1), captions as written.
    pic2word = "a photo of * , {} and {}".format(captions[1], captions[0])
    assert cfg.query_prompt.format(modification=query_modification(captions, cfg.caption_join)) == pic2word
    searle = MapperConfig.for_style("searle", 64, 64)
    assert searle.query_prompt.format(modification=query_modification(captions, searle.caption_join)) == \
        "a photo of $ that is red and shorter and has a logo"


@torch.no_grad()
def test_query_ids_around_the_placeholder(openai_tiny):
    tok = openai_tiny.tokenizer
    cfg = MapperConfig(64, token_width(openai_tiny.model))

    def body(text):  # the ids between the start and end tokens
        ids = tok([text])[0].tolist()
        return ids[1:ids.index(END)]
    ids = body(cfg.query_prompt.format(modification="has a logo and is red"))
    assert ids == body("a photo of") + [265] + body(",") + body("has a logo and is red")


class RecordingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def __call__(self, texts):
        self.seen.extend(texts)
        return self.tokenizer(texts)


class FixedImages:
    def __init__(self, width):
        self.width = width

    def __call__(self, names):
        return torch.randn(len(names), self.width, generator=torch.Generator().manual_seed(len(names)))


@pytest.mark.parametrize("style, expected", [
    ("pic2word", [["a photo of * , has a logo? and is red."]]),
    ("searle", [["a photo of $ that is red and has a logo"], ["a photo of $ that has a logo and is red"]]),
])
def test_composer_builds_the_styles_queries(openai_tiny, style, expected):
    model = openai_tiny.model
    tok = RecordingTokenizer(openai_tiny.tokenizer)
    mapper = PseudoWordMapper(MapperConfig.for_style(style, 32, token_width(model), hidden_dim=16, dropout=0.0))
    composer = Pic2Word(model, tok, mapper, FixedImages(32))
    tok.seen.clear()
    queries = composer.compose([Triplet("a", "b", ("is red.", "has a logo?"), "dress")], dataset=None)
    assert tok.seen == [p for group in expected for p in group]
    refs = FixedImages(32)(["a"])
    one = composer.encode_queries(refs, [query_modification(("is red.", "has a logo?"), mapper.config.caption_join)])
    if style == "pic2word":
        assert torch.allclose(queries, one)  # one query, no averaging
    else:
        two = composer.encode_queries(refs, ["has a logo and is red"])
        assert torch.allclose(queries, torch.nn.functional.normalize(one + two, dim=-1))


def test_old_mapper_configs_keep_searle_prompts(tmp_path):
    cfg = MapperConfig.for_style("searle", 8, 8)
    data = {k: v for k, v in cfg.__dict__.items() if k not in PROMPT_STYLES["searle"]}  # written before prompts
    (tmp_path / "mapper_config.json").write_text(json.dumps(data))
    assert MapperConfig.load(tmp_path / "mapper_config.json") == cfg
    MapperConfig(8, 8).save(tmp_path / "new.json")
    assert MapperConfig.load(tmp_path / "new.json").placeholder == "*"


def test_prompt_options_are_checked():
    with pytest.raises(ValueError, match="prompt style"):
        MapperConfig.for_style("clip", 8, 8)
    with pytest.raises(ValueError, match="caption_join"):
        MapperConfig(8, 8, caption_join="concat")
    with pytest.raises(ValueError, match="placeholder"):
        MapperConfig(8, 8, train_prompt="a photo of $")  # the default placeholder is "*"
