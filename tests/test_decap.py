"""DeCap shim: memory projection, CLIP-BPE decoder training, decoding, files, encoder swaps."""
import pytest
import torch
from torch import nn

from e2_adapter.zoo import create_clip
from integrations.captioning import embed_texts
from integrations.decap import DeCap, DeCapConfig, memory_weights, project_to_memory, train_decap
from conftest import WrongWidth, assert_swap_touches_no_weights, random_images


pytestmark = pytest.mark.usefixtures("one_thread")


BRANDS = ["Ostra", "Vetrano", "Lune Paris", "Ivo Brant"]
SUBCATS = ["SHIRTS", "COATS", "DRESSES", "PANTS"]
CAPTIONS = [f"{s.lower()} by {b} in wool." for b in BRANDS for s in SUBCATS]
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def clip():
    return create_clip("open_clip", "tiny", seed=0)


@pytest.fixture(scope="module")
def text_embeddings(clip):
    return embed_texts(clip.model, clip.tokenizer, CAPTIONS)


def tiny_decap(compact=True, embed_dim=64, **config):
    torch.manual_seed(0)
    cfg = DeCapConfig(embed_dim, **{**dict(n_layer=1, n_head=2, n_embd=32, max_caption_tokens=12, max_tokens=12),
                                    **config})
    return DeCap.for_captions(cfg, CAPTIONS) if compact else DeCap(cfg)


# -- memory projection ------------------------------------------------------------------------------
def test_memory_projection_is_a_convex_combination_of_memory_rows():
    g = torch.Generator().manual_seed(0)
    memory = nn.functional.normalize(torch.randn(6, 64, generator=g), dim=-1)
    e = torch.randn(5, 64, generator=g)
    for temperature in (0.01, 0.1, 1.0):
        w = memory_weights(e, memory, temperature)
        assert (w >= 0).all()
        assert torch.allclose(w.sum(-1), torch.ones(5), atol=1e-6)
        p = project_to_memory(e, memory, temperature)
        assert torch.allclose(p.norm(dim=-1), torch.ones(5), atol=1e-5)
        # p lies in the span of the memory rows: least squares reconstructs it exactly
        coeffs = torch.linalg.lstsq(memory.T, p.T).solution
        assert torch.allclose(memory.T @ coeffs, p.T, atol=1e-5)
        # and is the normalised weighted mean, with the softmax weights
        assert torch.allclose(p, nn.functional.normalize(w @ memory, dim=-1), atol=1e-6)


def test_temperature_moves_from_nearest_row_to_mean_direction():
    g = torch.Generator().manual_seed(1)
    memory = nn.functional.normalize(torch.randn(8, 64, generator=g), dim=-1)
    e = memory[3] + 0.3 * torch.randn(64, generator=g)
    nearest = memory[(nn.functional.normalize(e, dim=-1) @ memory.T).argmax()]
    cold = project_to_memory(e[None], memory, 1e-4)[0]
    hot = project_to_memory(e[None], memory, 1e4)[0]
    assert torch.allclose(cold, nearest, atol=1e-4)
    assert torch.allclose(hot, nn.functional.normalize(memory.mean(0), dim=-1), atol=1e-3)
    entropy = [-(w * w.clamp_min(1e-12).log()).sum() for w in
               (memory_weights(e[None], memory, t)[0] for t in (0.01, 0.1, 1.0))]
    assert entropy[0] < entropy[1] < entropy[2]  # warmer = spread over more rows


def test_empty_memory_is_a_clear_error():
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        tiny_decap().generate(torch.randn(2, 64))


# -- captions and training --------------------------------------------------------------------------
def test_encode_captions_uses_clip_bpe_with_start_end_and_padding():
    model = tiny_decap(compact=False, max_caption_tokens=8)
    ids = model.encode_captions(["shirts by Ostra.", "a very long caption that will not fit in eight tokens"])
    assert ids.shape == (2, 8)
    assert ids[0, 0] == SOT and ids[1, 0] == SOT
    assert ids[1, -1] == EOT  # truncated captions keep their end token
    row = ids[0].tolist()
    end = row.index(EOT)
    assert all(t == 0 for t in row[end + 1:])  # pad 0
    assert model.tokenizer.decode(row) == "shirts by ostra."


@pytest.mark.parametrize("compact", [True, False])
def test_text_only_training_lowers_the_loss_and_fills_the_memory(clip, text_embeddings, compact):
    model = tiny_decap(compact)
    losses = train_decap(model, clip.model, clip.tokenizer, CAPTIONS, text_embeddings=text_embeddings,
                         max_steps=30 if compact else 8, batch_size=8, lr=3e-3 if compact else 1e-2, warmup_steps=0)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    assert model.memory.shape == (len(CAPTIONS), 64)
    assert torch.allclose(model.memory.norm(dim=-1), torch.ones(len(CAPTIONS)), atol=1e-5)


def test_memory_size_subsamples_the_bank(clip, text_embeddings):
    model = tiny_decap()
    train_decap(model, clip.model, clip.tokenizer, CAPTIONS, text_embeddings=text_embeddings,
                max_steps=1, batch_size=8, memory_size=5)
    assert model.memory.shape == (5, 64) and model.config.memory_size == 5


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_generation_returns_text_for_a_batch(clip, text_embeddings, method):
    model = tiny_decap()
    model.set_memory(text_embeddings)
    captions = model.caption(clip.model, random_images(clip, 3), method=method)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert len(model.generate(text_embeddings[:2], project=False)) == 2


def test_trained_decoder_reads_captions_back_through_the_memory(clip):
    # distinct (near-orthogonal) text embeddings: each projects onto its own memory row
    embeddings = nn.functional.normalize(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    model = tiny_decap()
    train_decap(model, clip.model, clip.tokenizer, CAPTIONS[:4], text_embeddings=embeddings,
                max_steps=100, batch_size=4, lr=1e-2, warmup_steps=0)
    expected = [c.lower() for c in CAPTIONS[:4]]  # CLIP's BPE is lower-case
    noise = 0.05 * torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    assert model.generate(embeddings + noise) == expected
    assert model.generate(embeddings, method="beam") == expected


def test_save_and_load_round_trip_keeps_memory_and_vocabulary(tmp_path, clip, text_embeddings):
    model = tiny_decap()
    train_decap(model, clip.model, clip.tokenizer, CAPTIONS, text_embeddings=text_embeddings,
                max_steps=3, batch_size=8, lr=1e-3, encoder_name="open_clip:tiny")
    model.save_pretrained(tmp_path / "decap")
    loaded = DeCap.from_pretrained(tmp_path / "decap")
    assert loaded.config == model.config
    assert torch.equal(loaded.memory, model.memory) and torch.equal(loaded.vocab_ids, model.vocab_ids)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = random_images(clip, 2)
    assert loaded.caption(clip.model, x) == model.caption(clip.model, x)


def test_width_mismatch_is_a_clear_error(clip, text_embeddings):
    model = tiny_decap(encoder="open_clip:tiny")
    model.set_memory(text_embeddings)
    with pytest.raises(ValueError, match=r"trained on 64-d .*'open_clip:tiny'.* gives 32-d"):
        model.caption(WrongWidth(), random_images(clip, 2))
    with pytest.raises(ValueError, match="width mismatch"):
        model.set_memory(torch.randn(3, 32))
    with pytest.raises(ValueError, match="width mismatch"):
        train_decap(model, WrongWidth(), clip.tokenizer, CAPTIONS, max_steps=1)


def test_swapping_encoders_changes_only_the_encoder(clip, text_embeddings):
    other = create_clip("open_clip", "tiny", seed=1)
    model = tiny_decap()
    train_decap(model, clip.model, clip.tokenizer, CAPTIONS, text_embeddings=text_embeddings,
                max_steps=5, batch_size=8, lr=3e-3)
    assert_swap_touches_no_weights(model, model.caption, (clip.model, other.model), random_images(clip, 4))
