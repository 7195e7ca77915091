"""Drop-in for the real pipelines: half-precision CLIPs as their own converters leave them,
DataParallel replicas, and vendored copies of OpenAI's clip package."""
import copy

import pytest
import torch

import e2_adapter
from conftest import make_tiny

PRESETS = ("gated", "faithful", "lean")


def tiny_open_clip(cast_dtype=None, seed=0):
    """open_clip's tiny CLIP built as ``create_model(precision="fp16"/"bf16")`` builds it: with
    ``cast_dtype`` its norms are LayerNormFp32, which the low-precision weights need."""
    import open_clip
    from e2_adapter.zoo import VOCAB_SIZE, tiny_config
    cfg = tiny_config("tiny")
    torch.manual_seed(seed)
    return open_clip.CLIP(
        embed_dim=cfg["embed_dim"], cast_dtype=cast_dtype,
        vision_cfg=dict(image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["vision_width"],
                        layers=cfg["vision_layers"], head_width=cfg["vision_width"] // cfg["vision_heads"]),
        text_cfg=dict(context_length=cfg["context_length"], vocab_size=VOCAB_SIZE, width=cfg["text_width"],
                      heads=cfg["text_heads"], layers=cfg["text_layers"]),
    ).eval()


def openai_fp16(model):
    from clip.model import convert_weights
    convert_weights(model)
    return model


def open_clip_lp(dtype):
    def convert(model):
        from open_clip.model import convert_weights_to_lp
        convert_weights_to_lp(model, dtype=dtype)
        return model
    return convert


# (name, fp32 model factory, the family's own low-precision conversion, dtype, tolerance relative to the
# reference's largest magnitude; measured 0.8-1.6e-3 (fp16) and 0.6-1.1e-2 (bf16) on these tiny models)
LOW_PRECISION = {
    "openai-convert_weights-fp16": (lambda: make_tiny("openai"), openai_fp16, torch.float16, 5e-3),
    "open_clip-convert_weights_to_lp-fp16": (lambda: tiny_open_clip(torch.float16), open_clip_lp(torch.float16),
                                             torch.float16, 5e-3),
    "open_clip-convert_weights_to_lp-bf16": (lambda: tiny_open_clip(torch.bfloat16), open_clip_lp(torch.bfloat16),
                                             torch.bfloat16, 3e-2),
    "hf-half": (lambda: make_tiny("hf"), lambda m: m.half(), torch.float16, 5e-3),
}


def wrapped_pair(case, preset):
    """An fp32 wrapped model and the same model converted to low precision *before* wrapping (as
    ``clip.load(device="cuda")`` hands it over), with the same E2 initialisation."""
    build, convert, dtype, tol = LOW_PRECISION[case]
    reference = build()
    low = convert(copy.deepcopy(reference))
    torch.manual_seed(7)
    e2_adapter.wrap(reference, preset=preset)
    torch.manual_seed(7)
    e2_adapter.wrap(low, preset=preset)
    return reference, low, dtype, tol


def assert_close_relative(actual, expected, tol, what):
    scale = expected.abs().max().item()
    err = (actual.float() - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max difference {err:.3g} > {tol} x {scale:.3g}"


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("case", sorted(LOW_PRECISION))
def test_low_precision_clip_runs_and_matches_fp32(case, preset, one_thread):
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    reference, low, dtype, tol = wrapped_pair(case, preset)
    backend = e2_adapter.get_backend(low)
    assert backend.parameter_dtype() == dtype  # from the weights that compute, not class_embedding
    assert all(p.dtype == dtype for p in e2_adapter.get_adapter(low).parameters())

    with torch.no_grad():
        expected = e2_adapter.encode_image_regions(reference, images)
        out = e2_adapter.encode_image_regions(low, images.to(dtype))
        emb = e2_adapter.get_backend(low).encode_image(images.to(dtype))
    assert out.image.dtype == dtype and emb.dtype == dtype
    # A token whose two best patches score within the format's rounding may pick the other one (random
    # tiny models have near ties: 94-100% of picks agree here); images whose picks all agree are compared.
    picks_agree = out.selections == expected.selections
    assert picks_agree.float().mean() >= 0.9
    same = picks_agree.flatten(1).all(1)
    assert same.sum() >= len(same) // 2
    assert_close_relative(emb[same], expected.image[same], tol, "encode_image")
    assert_close_relative(out.image[same], expected.image[same], tol, "encode_image_regions image")
    for entity, region in expected.regions.items():
        assert out.regions[entity].dtype == dtype
        assert_close_relative(out.regions[entity][same], region[same], tol, f"region {entity}")


def test_low_precision_conversion_after_wrapping(images, one_thread):
    """clip's convert_weights applied to an already wrapped model turns E2's Linear weights to fp16
    and leaves its tokens, gate and norms in fp32: the forward still runs in the activations' dtype."""
    model = e2_adapter.wrap(make_tiny("openai"), preset="faithful")
    with torch.no_grad():
        expected = e2_adapter.encode_image_regions(model, images)
    openai_fp16(model)
    adapter = e2_adapter.get_adapter(model)
    assert adapter.tokens.dtype == torch.float32 and adapter.fusions[0].query.weight.dtype == torch.float16
    with torch.no_grad():
        out = e2_adapter.encode_image_regions(model, images.half())
    same = (out.selections == expected.selections).flatten(1).all(1)
    assert same.any()
    assert_close_relative(out.image[same], expected.image[same], 5e-3, "encode_image")
