"""CapDec shim: noise injection, mapping networks, text-only training, decoding, files, encoder swaps."""
import math

import pytest
import torch
from torch import nn

from e2_adapter.zoo import create_clip
from integrations.capdec import CapDec, inject_noise, small_gpt2_config, train_capdec
from integrations.captioning import WordTokenizer, embed_texts
from conftest import WrongWidth, assert_swap_touches_no_weights, random_images


pytestmark = pytest.mark.usefixtures("one_thread")


BRANDS = ["Ostra", "Vetrano", "Lune Paris", "Ivo Brant"]
SUBCATS = ["SHIRTS", "COATS", "DRESSES", "PANTS"]
CAPTIONS = [f"{s.lower()} by {b} in wool" for b in BRANDS for s in SUBCATS]  # one sentence each


@pytest.fixture(scope="module")
def clip():
    return create_clip("open_clip", "tiny", seed=0)


@pytest.fixture(scope="module")
def text_embeddings(clip):
    return embed_texts(clip.model, clip.tokenizer, CAPTIONS)


def tiny_capdec(mapping="mlp", embed_dim=64, **config):
    torch.manual_seed(0)
    tokenizer = WordTokenizer.fit(CAPTIONS + ["."])
    lm = small_gpt2_config(tokenizer, n_layer=1, n_head=2, n_embd=32, n_positions=64)
    defaults = dict(prefix_length=4, mapper_layers=2, mapper_heads=2, max_tokens=12)
    return CapDec.create(embed_dim, lm=lm, tokenizer=tokenizer, mapping=mapping, **{**defaults, **config})


# -- noise injection --------------------------------------------------------------------------------
def test_noise_statistics_before_and_after_renormalisation():
    x = torch.randn(4000, 64) * 3
    g = torch.Generator().manual_seed(0)
    noisy = inject_noise(x, 0.016, generator=g, renormalize=False)
    noise = noisy - nn.functional.normalize(x, dim=-1)
    assert abs(noise.mean().item()) < 2e-3
    assert noise.var().item() == pytest.approx(0.016, rel=0.03)
    assert noise.var(dim=0).min().item() > 0.016 * 0.85  # every dimension, not just on average
    assert noise.var(dim=0).max().item() < 0.016 * 1.15
    g = torch.Generator().manual_seed(0)
    unit = inject_noise(x, 0.016, generator=g)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(unit, nn.functional.normalize(noisy, dim=-1), atol=1e-6)


def test_zero_variance_only_normalises():
    x = torch.randn(5, 64)
    assert torch.allclose(inject_noise(x, 0.0), nn.functional.normalize(x, dim=-1))


# -- model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mapping, prefix", [("mlp", 10), ("transformer", 40)])
def test_default_prefix_lengths_follow_capdec(mapping, prefix):
    model = tiny_capdec(mapping, prefix_length=None, mapper_layers=1)
    assert model.config.prefix_length == prefix
    assert model.prefix(torch.randn(2, 64)).shape == (2, prefix, 32)


@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
def test_text_only_training_lowers_the_loss(clip, text_embeddings, mapping):
    model = tiny_capdec(mapping)
    losses = train_capdec(model, clip.model, clip.tokenizer, CAPTIONS, text_embeddings=text_embeddings,
                          max_steps=40, batch_size=8, lr=3e-3, warmup_steps=0)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_training_computes_text_embeddings_and_leaves_the_encoder_alone(clip):
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    model = tiny_capdec()
    train_capdec(model, clip.model, clip.tokenizer, CAPTIONS, max_steps=2, batch_size=8, lr=1e-3,
                 encoder_name="tiny-a")
    assert model.config.encoder == "tiny-a"
    for k, v in clip.model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_generation_returns_text_for_a_batch(clip, method):
    model = tiny_capdec()
    captions = model.caption(clip.model, random_images(clip, 3), method=method)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)


def test_stop_ids_are_end_of_text_and_the_stop_token():
    model = tiny_capdec(stop_token=".")
    assert model.stop_ids() == {model.tokenizer.eos_id, model.tokenizer.encode(".")[0]}
    assert tiny_capdec(stop_token=None).stop_ids() == {model.tokenizer.eos_id}
    with pytest.raises(ValueError, match="not one token"):
        tiny_capdec(stop_token="by wool").stop_ids()


def test_save_and_load_round_trip(tmp_path, clip, text_embeddings):
    model = tiny_capdec("transformer")
    train_capdec(model, clip.model, clip.tokenizer, CAPTIONS, text_embeddings=text_embeddings,
                 max_steps=3, batch_size=8, lr=1e-3)
    model.save_pretrained(tmp_path / "capdec")
    loaded = CapDec.from_pretrained(tmp_path / "capdec")
    assert loaded.config == model.config
    assert loaded.tokenizer.vocab == model.tokenizer.vocab
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = random_images(clip, 2)
    assert loaded.caption(clip.model, x, method="beam") == model.caption(clip.model, x, method="beam")
    assert not list((tmp_path / "capdec").glob("*.tmp"))  # atomic writes leave no temporaries


def test_width_mismatch_is_a_clear_error(clip):
    model = tiny_capdec(encoder="open_clip:tiny")
    with pytest.raises(ValueError, match=r"trained on 64-d .*'open_clip:tiny'.* gives 32-d"):
        model.caption(WrongWidth(), random_images(clip, 2))
    with pytest.raises(ValueError, match="width mismatch"):
        train_capdec(model, WrongWidth(), clip.tokenizer, CAPTIONS, max_steps=1)


def test_swapping_encoders_changes_only_the_encoder(clip, text_embeddings):
    other = create_clip("open_clip", "tiny", seed=1)
    model = tiny_capdec()
    train_capdec(model, clip.model, clip.tokenizer, CAPTIONS, text_embeddings=text_embeddings,
                 max_steps=5, batch_size=8, lr=3e-3)
    assert_swap_touches_no_weights(model, lambda encoder, x: model.caption(encoder, x, method="greedy"),
                                   (clip.model, other.model), random_images(clip, 4))
    assert math.isfinite(model.loss(text_embeddings[:2], *model.encode_captions(CAPTIONS[:2])).item())
