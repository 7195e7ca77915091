"""SEARLE's objective: textual inversion per image, then phi distilled from the inverted tokens."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from e2_adapter.evaluation.embed import embed_texts
from e2_adapter.zoo import create_clip
from integrations.cir.cli import main as cir_main
from integrations.cir.pic2word import MapperConfig, PseudoWordMapper
from integrations.cir.searle import (PhraseBank, distill_mapper, invert_images, searle_contrastive_loss)
from integrations.cir.text_injection import token_width

CONCEPTS = ["dress", "coat", "shirt"]


@pytest.fixture(scope="module")
def bundle():
    b = create_clip("open_clip", "tiny", seed=0)
    b.model.eval()
    return b


def images(n, width=64, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_oti_lowers_its_loss_and_leaves_the_model_alone(bundle):
    model = bundle.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = invert_images(model, bundle.tokenizer, images(4), bank=PhraseBank.from_concepts(CONCEPTS),
                           steps=15, batch_size=4, top_k=2)
    losses = result.losses[0]
    assert len(result.losses) == 1 and len(losses) == 15
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3  # by a margin, in a few steps
    assert result.tokens.shape == result.last_tokens.shape == (4, token_width(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_oti_cosine_term_alone_pulls_the_prompt_to_the_image(bundle):
    model, tok = bundle.model, bundle.tokenizer
    target = images(2, seed=3)
    result = invert_images(model, tok, target, steps=15, lambda_reg=0.0, ema_decay=0.0)  # EMA 0: the last token
    from integrations.cir.text_injection import encode_text_with_pseudo_tokens
    with torch.no_grad():
        text = encode_text_with_pseudo_tokens(model, tok(["a photo of $"] * 2), result.tokens, 259)
    cos = F.cosine_similarity(text, target).mean().item()
    assert 1 - cos < result.losses[0][0] - 0.1  # the final prompt matches better than the random start
    assert torch.equal(result.tokens, result.last_tokens)


def test_phrase_bank_checks_and_assigns_the_nearest_concept(bundle, tmp_path):
    with pytest.raises(ValueError, match="does not contain its concept"):
        PhraseBank.from_mapping({"coat": ["a photo of a jacket that is warm"]})
    with pytest.raises(ValueError, match="no phrases"):
        PhraseBank.from_mapping({"coat": []})
    (tmp_path / "bad.json").write_text(json.dumps({"coat": "a photo of coat"}))
    with pytest.raises(ValueError, match="JSON list of concepts"):
        PhraseBank.load(tmp_path / "bad.json")
    (tmp_path / "concepts.txt").write_text("dress\ncoat\n\n")
    bank = PhraseBank.load(tmp_path / "concepts.txt")
    assert bank.concepts == ["dress", "coat"] and all("a photo of coat that" in p for p in bank.phrases[1])
    # An image embedding equal to a concept prompt's text embedding is assigned that concept first.
    bank = PhraseBank.from_concepts(CONCEPTS)
    prompts = embed_texts(bundle.model, bundle.tokenizer, [f"a photo of a {c}" for c in CONCEPTS])
    assert bank.assign(bundle.model, bundle.tokenizer, prompts, top_k=2)[:, 0].tolist() == [0, 1, 2]


def test_contrastive_term_is_searles_nt_xent():
    g = torch.Generator().manual_seed(0)
    a, b, tau = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), 0.25
    # SEARLE's formula written out: over the 2B joint vectors, exp(sim(i, partner) / tau) over the sum of
    # exp(sim(i, j) / tau) for every j != i; minus the mean log of the ratio.
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = torch.exp(z @ z.T / tau)
    partner = torch.cat([torch.diag(sim[:5, 5:]), torch.diag(sim[5:, :5])])
    denominator = sim.sum(dim=0) - torch.diag(sim)
    expected = -torch.log(partner / denominator).mean()
    assert torch.allclose(searle_contrastive_loss(a, b, tau), expected, atol=1e-5)
    assert searle_contrastive_loss(a, a.clone(), tau) < searle_contrastive_loss(a, b, tau)


def test_distilled_phi_moves_toward_the_oti_targets(bundle):
    model = bundle.model
    x = images(8, seed=1)
    targets = torch.randn(8, token_width(model), generator=torch.Generator().manual_seed(2)) * 0.1
    config = MapperConfig.for_style("searle", 64, token_width(model), hidden_dim=32, dropout=0.0)
    torch.manual_seed(0)
    mapper = PseudoWordMapper(config)
    with torch.no_grad():
        before = F.mse_loss(mapper(x), targets).item()
    mapper, losses = distill_mapper(model, bundle.tokenizer, x, targets, mapper=mapper, steps=40, batch_size=8,
                                    lr=1e-2, lambda_distance=1.0, bank=PhraseBank.from_concepts(CONCEPTS), top_k=2)
    with torch.no_grad():
        after = F.mse_loss(mapper(x), targets).item()
        cos = F.cosine_similarity(mapper(x), targets).mean().item()
    assert after < 0.5 * before and cos > 0.5
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="OTI tokens for"):
        distill_mapper(model, bundle.tokenizer, x, targets[:3], mapper=mapper, steps=1)


def write_folder(root, n=6):
    """A FashionIQ-layout folder of n flat-colour images (the CLI's training data)."""
    for sub in ("captions", "image_splits", "images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = [f"im{i}" for i in range(n)]
    for i, name in enumerate(names):
        Image.new("RGB", (16, 16), (40 * i % 256, 255 - 30 * i % 256, 90)).save(root / "images" / f"{name}.png")
    (root / "image_splits" / "split.dress.train.json").write_text(json.dumps(names))
    (root / "captions" / "cap.dress.train.json").write_text(json.dumps(
        [{"candidate": names[0], "target": names[1], "captions": ["is red", "is longer"]}]))
    return root


def test_cli_selects_the_searle_objective(tmp_path):
    data = write_folder(tmp_path / "fiq")
    (tmp_path / "concepts.json").write_text(json.dumps({"dress": ["a photo of dress that is long"],
                                                        "coat": ["a photo of coat that is warm"]}))
    common = ["train", "--data", str(data), "--split", "train", "--steps", "3", "--batch-size", "4",
              "--hidden-dim", "16", "--hidden-layers", "1"]
    out = cir_main(common + ["--out", str(tmp_path / "searle"), "--objective", "searle", "--oti-steps", "4",
                             "--concepts", str(tmp_path / "concepts.json")])
    log = json.loads((out / "train_log.json").read_text())
    assert log["objective"] == "searle" and len(log["losses"]) == 3
    assert [len(b) for b in log["oti_losses"]] == [4] and log["images"] == 6
    assert PseudoWordMapper.load(out).config.placeholder == "$"  # SEARLE's prompts by default
    out = cir_main(common + ["--out", str(tmp_path / "p2w")])
    log = json.loads((out / "train_log.json").read_text())
    assert log["objective"] == "pic2word" and "oti_losses" not in log
    assert PseudoWordMapper.load(out).config.placeholder == "*"
    with pytest.raises(SystemExit, match="--objective searle"):
        cir_main(common + ["--out", str(tmp_path / "x"), "--oti-steps", "4"])


def test_train_searle_runs_both_stages_with_any_prompt_style(bundle):
    from integrations.cir.searle import train_searle
    config = MapperConfig(64, token_width(bundle.model), hidden_dim=16, dropout=0.0)  # Pic2Word's "*" prompts
    mapper, record = train_searle(bundle.model, bundle.tokenizer, images(4), config, oti_steps=3, steps=2,
                                  batch_size=4, bank=PhraseBank.from_concepts(CONCEPTS), distill={"top_k": 2},
                                  oti={"top_k": 2})
    assert mapper.config is config and [len(b) for b in record["oti_losses"]] == [3] and len(record["losses"]) == 2
    assert record["oti_tokens"].shape == (4, token_width(bundle.model))
