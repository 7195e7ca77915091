"""Towers that pool over their patches or carry no class token: open_clip timm towers (SigLIP's MAP
head and the other timm ViT layouts), open_clip attention-pool / avg-pool ViTs, HF SiglipModel and
SiglipVisionModel; and SigLIP's sigmoid loss, chosen from the model. Tiny random models only."""
import copy
import math
import pickle

import pytest
import torch

import e2_adapter
from e2_adapter.backends import hf_siglip, hf_siglip2, open_clip_timm


def _open_clip_vit(**vision):
    import open_clip
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=32, vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=8,
                                                        image_size=32, **vision),
                          text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)).eval()


# name -> (builder, backend family, whether it pools over its patches)
MODELS = {
    # ViT-B-16-SigLIP's layout at width 64: no class token, patch-only positions, MAP head, no projection
    "open_clip_siglip": (lambda: open_clip_timm.tiny_model(), "open_clip_timm", True),
    "timm_token": (lambda: open_clip_timm.tiny_model(pool="token", class_token=True, no_embed_class=False,
                                                     proj="linear", sigmoid=False), "open_clip_timm", False),
    "timm_avg_registers": (lambda: open_clip_timm.tiny_model(pool="avg", class_token=True, reg_tokens=2,
                                                             proj="trunk", sigmoid=False), "open_clip_timm", True),
    "timm_avg_no_class_token": (lambda: open_clip_timm.tiny_model(pool="avg", class_token=False, sigmoid=False),
                                "open_clip_timm", True),
    # ViTamin's layout: a convolutional stem in timm's HybridEmbed (no patch projection), average pooling
    "timm_hybrid_stem": (lambda: open_clip_timm.tiny_model(pool="avg", hybrid_stem=True, proj="linear",
                                                           sigmoid=False), "open_clip_timm", True),
    # EVA02-B-16's layout: timm Eva trunk, rotary positions, class-token pool, the trunk head as projection
    "timm_eva02": (lambda: open_clip_timm.tiny_model(pool="token", class_token=True, no_embed_class=False,
                                                     proj="trunk", sigmoid=False, eva02=True), "open_clip_timm", False),
    "timm_eva02_avg_registers": (lambda: open_clip_timm.tiny_model(pool="avg", class_token=True, reg_tokens=1,
                                                                   proj="trunk", sigmoid=False, eva02=True),
                                 "open_clip_timm", True),
    # CoCa's attention pool (coca_ViT-B-32's tower with output_tokens off); open_clip's WIP "parallel" /
    # "cascade" pools are in no model config and return [B, 1, D], so they are not tested here
    "open_clip_attn_pool": (lambda: _open_clip_vit(attentional_pool=True, attn_pooler_queries=4,
                                                   attn_pooler_heads=2), "open_clip", True),
    "open_clip_avg": (lambda: _open_clip_vit(pool_type="avg"), "open_clip", True),
    "hf_siglip": (lambda: hf_siglip.tiny_model(), "hf_siglip", True),
    "hf_siglip_vision": (lambda: hf_siglip.tiny_model(vision_only=True), "hf_siglip", True),
    # SigLIP 2 (NaFlex): patches in, a padding mask and each image's grid; image batches are cut here
    "hf_siglip2": (lambda: hf_siglip2.tiny_model(), "hf_siglip2", True),
    "hf_siglip2_vision": (lambda: hf_siglip2.tiny_model(vision_only=True), "hf_siglip2", True),
}


@pytest.fixture(params=sorted(MODELS))
def name(request):
    return request.param


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def build(name):
    return MODELS[name][0]()


def encode(model, images):
    return e2_adapter.get_backend(model).encode_image(images)


def test_family_and_pooling_are_read_from_the_model(name):
    model = build(name)
    backend = e2_adapter.get_backend(model)
    assert backend.family == MODELS[name][1] and backend.pools_patches == MODELS[name][2]
    # the default preset (auto) follows: gated for a tower that pools its patches, else faithful
    preset = e2_adapter.get_adapter(e2_adapter.wrap(model)).config.preset
    assert preset == ("gated" if MODELS[name][2] else "faithful")


def test_shapes_and_selections(name, images):
    model = e2_adapter.wrap(build(name), entities=("brand", "season"))
    out = e2_adapter.encode_image_regions(model, images)
    dim = encode(copy.deepcopy(e2_adapter.unwrap(copy.deepcopy(model))), images).shape[1]
    assert out.image.shape == (3, dim) and set(out.regions) == {"brand", "season"}
    assert all(v.shape == (3, dim) for v in out.regions.values())
    adapter = e2_adapter.get_adapter(model)
    assert out.selections.shape == (3, len(adapter.fusion_after), 4)
    assert out.selections.min() >= 0 and out.selections.max() < 16  # a 4 x 4 grid of patches
    assert torch.equal(encode(model, images), out.image)  # the family's own call runs E2


def test_gated_wrap_equals_the_original_at_step_0_and_the_gate_opens(name, images):
    model = build(name)
    before = encode(model, images)
    e2_adapter.wrap(model, preset="gated")  # what the default (auto) picks for the pooling towers
    assert torch.allclose(encode(model, images), before, atol=1e-5), (encode(model, images) - before).abs().max()
    adapter = e2_adapter.get_adapter(model)
    with torch.no_grad():
        adapter.gate.fill_(0.5)  # open the gate: the tokens now reach the global embedding
    assert not torch.allclose(encode(model, images), before, atol=1e-4)


def test_gradients_reach_every_adapter_parameter(name, images):
    model = e2_adapter.wrap(build(name)).train()
    out = e2_adapter.encode_image_regions(model, images)
    (out.image.pow(2).sum() + sum(v.pow(2).sum() for v in out.regions.values())).backward()
    for pname, p in e2_adapter.get_adapter(model).named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_eval_is_deterministic(name, images):
    model = e2_adapter.wrap(build(name)).eval()
    a, b = e2_adapter.encode_image_regions(model, images), e2_adapter.encode_image_regions(model, images)
    assert torch.equal(a.image, b.image) and torch.equal(a.selections, b.selections)
    assert all(torch.equal(a.regions[k], b.regions[k]) for k in a.regions)


def test_unwrap_restores_exact_original(name, images):
    model = build(name)
    original = copy.deepcopy(model)
    keys = set(model.state_dict())
    e2_adapter.unwrap(e2_adapter.wrap(model))
    assert not e2_adapter.is_wrapped(model) and set(model.state_dict()) == keys
    assert torch.equal(encode(model, images), encode(original, images))


def test_save_load_round_trip(name, images, tmp_path):
    model = e2_adapter.wrap(build(name), entities=("brand", "composition"))
    with torch.no_grad():
        for p in e2_adapter.get_adapter(model).parameters():
            p.add_(0.01 * torch.randn_like(p))
    e2_adapter.save_adapter(model, tmp_path / "adapter")
    other = e2_adapter.load_adapter(build(name), tmp_path / "adapter")
    a, b = e2_adapter.encode_image_regions(model, images), e2_adapter.encode_image_regions(other, images)
    assert torch.equal(a.image, b.image) and all(torch.equal(a.regions[k], b.regions[k]) for k in a.regions)


def test_deepcopy_and_pickle(images):
    model = e2_adapter.wrap(build("open_clip_siglip"))
    with torch.no_grad():
        e2_adapter.get_adapter(model).gate.fill_(0.3)
    expected = encode(model, images)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(encode(clone, images), expected)


@pytest.mark.parametrize("name", [n for n, (_, _, pools) in sorted(MODELS.items()) if pools])
@pytest.mark.parametrize("preset", ["faithful", "lean"])
def test_pooling_towers_refuse_dropping_the_patches(name, preset):
    model = build(name)
    with pytest.raises(ValueError, match="pools its global embedding over the patch tokens.*preset='gated'"):
        e2_adapter.wrap(model, preset=preset)
    assert not e2_adapter.is_wrapped(model)


@pytest.mark.parametrize("tower", ["timm_token", "timm_eva02"])
def test_timm_class_token_tower_takes_the_faithful_layout(tower, images):
    model = e2_adapter.wrap(build(tower), preset="faithful")
    out = e2_adapter.encode_image_regions(model, images)
    assert out.tokens.shape[1] == 1 + 8  # the last block saw CLS + tokens: patches dropped
    e2_adapter.unwrap(model)
    e2_adapter.wrap(model, token_init="cls")  # a class token to start from
    with pytest.raises(e2_adapter.UnsupportedModelError, match="no class token.*token_init='normal'"):
        e2_adapter.wrap(build("open_clip_siglip"), token_init="cls")


def test_eva_rotary_patch_dropout_trains(images):
    # timm drops patches inside Eva's _pos_embed and gathers each image's rotations: [B, 1, N', 2d]
    from timm.layers import PatchDropoutWithIndices
    model = build("timm_eva02")
    model.visual.trunk.patch_drop = PatchDropoutWithIndices(0.5, num_prefix_tokens=1)
    model = e2_adapter.wrap(model).train()
    out = e2_adapter.encode_image_regions(model, images)
    assert out.selections.max() < 8  # half of the 16 patches kept
    out.image.sum().backward()
    assert e2_adapter.get_adapter(model).tokens.grad is not None


def test_eva_mixed_rotary_positions_are_refused():
    model = build("timm_eva02")
    model.visual.trunk.rope_mixed = True
    with pytest.raises(e2_adapter.UnsupportedModelError, match="'mixed'.*rotary"):
        e2_adapter.wrap(model)


@pytest.mark.parametrize("tower", ["open_clip_siglip", "timm_eva02"])
def test_timm_gradient_checkpointing_matches(tower, images):
    model = e2_adapter.wrap(build(tower), preset="gated").train()
    reference = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    for m in (model, reference):
        torch.manual_seed(0)
        m.encode_image(images).sum().backward()
    a, b = e2_adapter.get_adapter(model), e2_adapter.get_adapter(reference)
    assert torch.allclose(a.gate.grad, b.gate.grad, atol=1e-5)


def _naflex_batch(images):
    """The Siglip2 processor's output for images of different grids: image 0 whole (4 x 4 patches),
    image 1 its top half (2 x 4, then 8 padding patches), image 2 a 3 x 2 crop (6, then 10 padding)."""
    rows = []
    for image, (h, w) in zip(images, [(32, 32), (16, 32), (24, 16)]):
        values, _, _ = hf_siglip2.patchify(image[None, :, :h, :w], 8)
        rows.append(values[0])
    lengths = torch.tensor([len(r) for r in rows])
    # loud padding (the processor writes zeros): if anything read it, the tests below would see it
    pixel_values = torch.full((3, 16, rows[0].shape[1]), 30.0)
    for i, r in enumerate(rows):
        pixel_values[i, :len(r)] = r
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    return dict(pixel_values=pixel_values, pixel_attention_mask=mask,
                spatial_shapes=torch.tensor([[4, 4], [2, 4], [3, 2]])), lengths


def test_hf_siglip2_padded_patch_sequences(images):
    model = build("hf_siglip2")
    inputs, lengths = _naflex_batch(images)
    before = model.get_image_features(**inputs).pooler_output
    e2_adapter.wrap(model)
    after = model.get_image_features(**inputs).pooler_output
    assert torch.allclose(after, before, atol=1e-5), (after - before).abs().max()  # padding still ignored
    # the padding is never picked, whatever the tokens prefer
    tower = e2_adapter.get_backend(model).tower
    out = e2_adapter.tower.e2_forward(e2_adapter.get_backend(model).at_tower(tower), tower.e2,
                                      inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"],
                                      spatial_shapes=inputs["spatial_shapes"])
    assert (out.selections < lengths[:, None, None]).all()
    # and the padding changes nothing: image 1 alone, unpadded, gives the same embedding
    alone = {k: v[1:2] for k, v in inputs.items()}
    alone["pixel_values"], alone["pixel_attention_mask"] = alone["pixel_values"][:, :8], alone["pixel_attention_mask"][:, :8]
    with torch.no_grad():
        e2_adapter.get_adapter(model).gate.fill_(0.5)
    padded, unpadded = model.get_image_features(**inputs).pooler_output[1], model.get_image_features(**alone).pooler_output[0]
    assert torch.allclose(padded, unpadded, atol=1e-5), (padded - unpadded).abs().max()


def test_hf_siglip2_patches_match_its_image_processor(images):
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches
    values, mask, shapes = hf_siglip2.patchify(images, 8)
    assert torch.equal(values[1], convert_image_to_patches(images[1], 8))
    assert mask.all() and shapes.tolist() == [[4, 4]] * 3


def test_hf_siglip_outputs_keep_their_format(images):
    model = e2_adapter.wrap(build("hf_siglip"))
    out = model.vision_model(pixel_values=images)
    assert out.pooler_output.shape == (3, 64)
    assert torch.equal(model.get_image_features(pixel_values=images).pooler_output, out.pooler_output)


# --- refusals ------------------------------------------------------------------------------------

def test_convnext_timm_tower_is_refused_naming_model_and_reason():
    import timm
    model = open_clip_timm.tiny_model(pool="avg", sigmoid=False)
    model.visual.trunk = timm.create_model("convnext_atto", pretrained=False, num_classes=0,
                                           depths=(1, 1, 1, 1), dims=(8, 8, 8, 64))
    with pytest.raises(e2_adapter.UnsupportedModelError,
                       match=r"CustomTextCLIP has a timm ConvNeXt image tower.*convolutional trunk has no patch"):
        e2_adapter.wrap(model)
    assert not e2_adapter.is_wrapped(model)


def test_resnet_and_coca_style_output_tokens_are_refused():
    import open_clip
    resnet = open_clip.CLIP(embed_dim=32, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=32),
                            text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))
    with pytest.raises(e2_adapter.UnsupportedModelError, match=r"open_clip.model.CLIP has a ResNet.*needs a ViT"):
        e2_adapter.wrap(resnet)
    coca_like = _open_clip_vit(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2,
                               output_tokens=True)
    with pytest.raises(e2_adapter.UnsupportedModelError, match="output_tokens=True"):
        e2_adapter.wrap(coca_like)
    with pytest.raises(e2_adapter.UnsupportedModelError, match="pool_type='none'.*every token"):
        e2_adapter.wrap(_open_clip_vit(pool_type="none"))


def test_hf_siglip_without_a_head_is_refused():
    from transformers import SiglipVisionConfig, SiglipVisionModel
    model = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=32, patch_size=8,
                                                 vision_use_head=False))
    with pytest.raises(e2_adapter.UnsupportedModelError, match="SiglipVisionModel was built with vision_use_head"):
        e2_adapter.wrap(model)


# --- the loss follows the model -------------------------------------------------------------------

def test_loss_family_is_read_from_the_model(make_tiny):
    assert e2_adapter.get_backend(build("open_clip_siglip")).loss_family == "sigmoid"
    assert e2_adapter.get_backend(build("hf_siglip")).loss_family == "sigmoid"
    assert e2_adapter.get_backend(build("timm_token")).loss_family == "softmax"
    assert e2_adapter.get_backend(make_tiny("hf")).loss_family == "softmax"


def test_sigmoid_losses_match_their_definition():
    from e2_adapter.losses import sigmoid_loss, sigmoid_region_loss
    torch.manual_seed(0)
    image, text, scale, bias = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(math.log(10.0)), torch.tensor(-3.0)
    n = torch.nn.functional.normalize
    logits = 10 * n(image) @ n(text).t() - 3
    expected = sum(-torch.nn.functional.logsigmoid(logits[i, j] * (1 if i == j else -1))
                   for i in range(4) for j in range(4)) / 4
    torch.testing.assert_close(sigmoid_loss(image, text, scale, bias), expected)
    # a tag value two images carry is one text with two positive pairs; a perfect model has ~0 loss
    values = torch.eye(3)
    ids = torch.tensor([0, 0, 1, 2])
    big = torch.tensor(math.log(100.0))
    assert sigmoid_region_loss(values[ids], ids, values, big, torch.tensor(-50.0)) < 1e-3
    worse = sigmoid_region_loss(values[ids], torch.tensor([1, 0, 1, 2]), values, big, torch.tensor(-50.0))
    assert worse > 1


def test_sigmoid_shares_sum_to_the_one_process_loss():
    from e2_adapter.losses import e2_loss, e2_loss_share
    torch.manual_seed(1)
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    regions = {"brand": torch.randn(6, 8)}
    ids, tag_text = {"brand": torch.tensor([0, 1, 0, 2, 1, 0])}, {"brand": torch.randn(3, 8)}
    scale, bias = torch.tensor(2.0), torch.tensor(-1.0)
    whole = e2_loss(image, text, regions, ids, tag_text, scale, loss="sigmoid", logit_bias=bias)
    shares = [e2_loss_share(image, text, regions, ids, tag_text, rows, scale, loss="sigmoid", logit_bias=bias)
              for rows in (slice(0, 2), slice(2, 6))]
    for k, v in whole.items():
        torch.testing.assert_close(shares[0][k] + shares[1][k], v)
    softmax = e2_loss(image, text, regions, ids, tag_text, scale)
    assert not torch.allclose(softmax["loss"], whole["loss"])
    with pytest.raises(ValueError, match="logit_bias"):
        e2_loss(image, text, regions, ids, tag_text, scale, loss="sigmoid")


@pytest.mark.parametrize("name", ["open_clip_siglip", "hf_siglip"])
def test_trainer_objective_uses_the_sigmoid_loss_for_siglip(name, images):
    from e2_adapter.config import E2Config
    from e2_adapter.losses import e2_loss
    from e2_adapter.training.config import TrainConfig
    from e2_adapter.training.trainer import ContrastiveObjective
    from e2_adapter.zoo import bpe_tokenizer
    model = e2_adapter.wrap(build(name), entities=("brand",)).eval()  # eval: argmax selection, comparable
    tokenizer = bpe_tokenizer(16)
    objective = ContrastiveObjective(model, TrainConfig(adapter=E2Config(entities=("brand",))), tokenizer)
    texts, tags = ["a red coat", "a blue bag", "a red coat"], {"brand": ["Ostra", "Vetrano", "Ostra"]}
    with torch.no_grad():
        parts = objective(images, texts, tags, text_frozen=True)
        backend = e2_adapter.get_backend(model)
        out = e2_adapter.encode_image_regions(model, images)
        text = backend.encode_text(tokenizer(texts))
        tag_text = backend.encode_text(tokenizer(["Ostra", "Vetrano"]))
        kwargs = dict(logit_bias=backend.logit_bias)
        expected = e2_loss(out.image, text, out.regions, {"brand": torch.tensor([0, 1, 0])}, {"brand": tag_text},
                           backend.logit_scale, loss="sigmoid", **kwargs)
    for k, v in expected.items():
        torch.testing.assert_close(parts[k], v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["hf_siglip", "hf_siglip2"])
def test_hf_siglip_save_pretrained_round_trip(name, images, tmp_path):
    """A wrapped SiglipModel / Siglip2Model is one save_pretrained folder that from_pretrained rebuilds offline."""
    model = e2_adapter.wrap(build(name))
    with torch.no_grad():
        e2_adapter.get_adapter(model).gate.fill_(0.2)
    source = dict(family="hf", model="siglip-tiny", pretrained=None, image_size=32,
                  tokenizer={"kind": "clip_bpe", "context_length": 16})
    e2_adapter.save_pretrained(model, tmp_path / "m", source=source)
    bundle = e2_adapter.from_pretrained(tmp_path / "m")
    assert type(bundle.model) is type(model) and e2_adapter.is_wrapped(bundle.model)
    assert torch.equal(encode(bundle.model, images), encode(model, images))


@pytest.mark.parametrize("family", ["open_clip", "hf"])
def test_tiny_siglip_trains_end_to_end_from_the_cli_with_lora(family, fashionsynth, tmp_path):
    # the zoo's tiny-siglip (a timm tower for open_clip, a SiglipModel for hf), trained by the CLI with
    # LoRA on the vision blocks, then reloaded in one line: same weights, sigmoid loss, trained adapter
    from e2_adapter.cli import main
    from e2_adapter.zoo import create_clip
    train, _ = fashionsynth(products=32, val_products=8, seed=0, image_size=32)
    out = tmp_path / "run"
    assert main(["train", "--family", family, "--model", "tiny-siglip", "--train", str(train), "--out", str(out),
                 "--batch-size", "8", "--stage1-steps", "1", "--stage2-steps", "2", "--warmup-steps", "1",
                 "--lora-rank", "2", "--seed", "0"]) in (0, None)
    loaded = e2_adapter.from_pretrained(out / "best")
    backend = e2_adapter.get_backend(loaded.model)
    assert backend.family == MODELS[f"{family}_siglip" if family == "hf" else "open_clip_siglip"][1]
    assert backend.loss_family == "sigmoid" and not any("lora_" in n for n, _ in loaded.model.named_parameters())
    fresh = e2_adapter.wrap(create_clip(family, "tiny-siglip", seed=0).model)
    trained, start = loaded.model.state_dict(), fresh.state_dict()
    assert trained.keys() == start.keys()
    vision_moved = [k for k in trained if "visual" in k or "vision" in k]
    # stage 2's LoRA (merged on save) moved the tower's MLPs; stage 1 moved E2's tokens
    assert any(not torch.equal(trained[k], start[k]) for k in vision_moved if "fc" in k and ".e2." not in k)
    assert any(not torch.equal(trained[k], start[k]) for k in trained if k.endswith("e2.tokens"))
