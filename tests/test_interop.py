"""Drop-in for the real pipelines: half-precision CLIPs as their own converters leave them,
DataParallel replicas, and vendored copies of OpenAI's clip package."""
import copy
import json
import math

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


# --- DataParallel -----------------------------------------------------------------------------------

def replicate_on_cpu(model, n, monkeypatch):
    """torch.nn.parallel.replicate, the function DataParallel calls, run on CPU.

    replicate refuses CPU devices, so only its device copy is emulated (each replica gets autograd-linked
    clones, as Broadcast gives); the module copying, where a shared forward would leak, is torch's own."""
    import torch.nn.parallel.replicate  # noqa: F401  (the submodule, not the function of that name)
    import sys
    rep = sys.modules["torch.nn.parallel.replicate"]
    monkeypatch.setattr(rep, "_get_device_index", lambda device, optional=False: device)
    monkeypatch.setattr(rep, "_broadcast_coalesced_reshape",
                        lambda tensors, devices, detach=False: [[t.detach().clone() if detach else t.clone()
                                                                 for t in tensors] for _ in devices])
    return rep.replicate(model, list(range(n)))


def a_block_weight(model):
    tower = e2_adapter.get_backend(model).tower
    blocks = tower.encoder.layers if hasattr(tower, "encoder") else tower.transformer.resblocks
    return next(p for n, p in blocks[0].named_parameters(recurse=True) if n.endswith("weight") and p.dim() == 2)


def replica_weight(replica, original_model, original_weight):
    """The replica's tensor standing where ``original_weight`` is in the original (replicas hold
    their weights as plain attributes, not parameters)."""
    names = {id(p): n for n, p in original_model.named_parameters()}
    obj = replica
    *path, leaf = names[id(original_weight)].split(".")
    for part in path:
        obj = getattr(obj, part)
    return getattr(obj, leaf)


@pytest.mark.parametrize("preset", ("gated", "faithful"))
def test_data_parallel_replicas_run_their_own_weights(family, preset, images, monkeypatch, one_thread):
    model = e2_adapter.wrap(make_tiny(family), preset=preset)
    encode = lambda m: e2_adapter.get_backend(m).encode_image(images)
    with torch.no_grad():
        expected = encode(model)
        replicas = replicate_on_cpu(model, 2, monkeypatch)
        replica_out = encode(replicas[0])
        for replica in replicas:
            assert e2_adapter.is_wrapped(replica)
            # not bit-equal: with the gated mask torch's attention takes another kernel for weights that
            # do not require grad (a replica's, under no_grad); the difference is float rounding (1e-6)
            assert torch.allclose(encode(replica), expected, atol=1e-5)

        adapter = e2_adapter.get_adapter(model)
        # a CLIP weight, and an E2 one that reaches encode_image (gated: the tokens only through the gate)
        for weight in (a_block_weight(model), adapter.gate if adapter.gate is not None else adapter.tokens):
            replicas = replicate_on_cpu(model, 2, monkeypatch)
            w = replica_weight(replicas[1], model, weight)
            w.add_(0.5 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
            changed = encode(replicas[1])
            assert not torch.allclose(changed, expected, atol=1e-2)  # the replica ran its own, changed weight
            assert torch.equal(encode(replicas[0]), replica_out)
            assert torch.equal(encode(model), expected)


def test_data_parallel_replica_gradients_reach_the_original(images, monkeypatch, one_thread):
    model = e2_adapter.wrap(make_tiny("open_clip")).train()
    replica = replicate_on_cpu(model, 2, monkeypatch)[1]
    e2_adapter.encode_image_regions(replica, images).regions["brand"].sum().backward()
    adapter = e2_adapter.get_adapter(model)
    assert adapter.tokens.grad is not None and adapter.tokens.grad.abs().sum() > 0
    assert a_block_weight(model).grad is not None


# --- vendored copies of OpenAI's clip package ----------------------------------------------------------

def vendored_clip_module(name, original_positions=False):
    """The installed clip package's model.py loaded again under another module name, as Pic2Word and
    many research repos vendor it (``model.model``, ``third_party.clip.model``). With
    ``original_positions`` its encode_text adds the whole positional table, as OpenAI's own package
    does (clip-anytorch slices it to the input's length)."""
    import inspect
    import sys
    import types
    import clip.model
    source = inspect.getsource(clip.model)
    if original_positions:
        sliced = "self.positional_embedding[:n_ctx]"
        assert sliced in source, "clip-anytorch changed: the test's rewrite no longer applies"
        source = source.replace(sliced, "self.positional_embedding")
    module = types.ModuleType(name)
    module.__file__ = f"<vendored {name}>"
    sys.modules[name] = module  # deepcopy / pickling of classes look the module up by name
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def tiny_vendored(module, resnet=False, seed=0):
    from e2_adapter.zoo import VOCAB_SIZE, tiny_config
    cfg = tiny_config("tiny")
    torch.manual_seed(seed)
    return module.CLIP(embed_dim=cfg["embed_dim"], image_resolution=64 if resnet else cfg["image_size"],
                       vision_layers=(1, 1, 1, 1) if resnet else cfg["vision_layers"],
                       vision_width=8 if resnet else cfg["vision_width"], vision_patch_size=cfg["patch_size"],
                       context_length=cfg["context_length"], vocab_size=VOCAB_SIZE,
                       transformer_width=cfg["text_width"], transformer_heads=cfg["text_heads"],
                       transformer_layers=cfg["text_layers"]).eval()


def short_tokens(context_length):
    tokens = torch.zeros(2, context_length, dtype=torch.long)
    tokens[:, 0], tokens[0, 1:4], tokens[0, 4], tokens[1, 1] = 49406, torch.tensor([5, 6, 7]), 49407, 49407
    return tokens


@pytest.mark.parametrize("original_positions", (False, True), ids=("anytorch-copy", "openai-copy"))
def test_vendored_openai_clip_wraps_and_equals_unwrapped_at_step_0(original_positions, images, one_thread):
    module = vendored_clip_module(f"vendored_{int(original_positions)}.model", original_positions)
    model = tiny_vendored(module)
    assert type(model).__module__ != "clip.model"
    tokens = short_tokens(model.context_length)
    with torch.no_grad():
        expected_image, expected_text = model.encode_image(images), model.encode_text(tokens)
    e2_adapter.wrap(model, preset="gated")  # the gated preset starts where CLIP is
    backend = e2_adapter.get_backend(model)
    assert backend.family == "openai"
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), expected_image, atol=1e-6)
        assert torch.allclose(backend.encode_image(images), expected_image, atol=1e-6)
        assert torch.allclose(backend.encode_text(tokens), expected_text, atol=1e-6)
        out = e2_adapter.encode_image_regions(model, images)
    assert torch.allclose(out.image, expected_image, atol=1e-6) and len(out.regions) == 4
    e2_adapter.unwrap(model)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), expected_image)


@pytest.mark.parametrize("preset", PRESETS)
def test_vendored_copy_wraps_as_the_package_does(preset, images, one_thread):
    """Every preset: a vendored copy wrapped computes what clip.model's CLIP wrapped computes."""
    vendored = tiny_vendored(vendored_clip_module("vendored_twin.model"))
    packaged = make_tiny("openai")
    packaged.load_state_dict(vendored.state_dict())
    for model in (vendored, packaged):
        torch.manual_seed(3)
        e2_adapter.wrap(model, preset=preset)
    with torch.no_grad():
        a, b = e2_adapter.encode_image_regions(vendored, images), e2_adapter.encode_image_regions(packaged, images)
    assert torch.equal(a.image, b.image) and torch.equal(a.selections, b.selections)
    assert all(torch.equal(a.regions[k], b.regions[k]) for k in b.regions)


def test_vendored_resnet_clip_is_refused_with_the_reason():
    model = tiny_vendored(vendored_clip_module("vendored_rn.model"), resnet=True)
    with pytest.raises(e2_adapter.backends.UnsupportedModelError, match="ResNet"):
        e2_adapter.wrap(model)


def test_a_model_without_clip_structure_is_still_refused():
    class NotClip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(3, 3)

        def encode_image(self, x):
            return self.visual(x)

        def encode_text(self, x):
            return x

    with pytest.raises(e2_adapter.backends.UnsupportedModelError, match="not a CLIP family"):
        e2_adapter.wrap(NotClip())


# --- bf16 autocast at step 0 (clip_benchmark's default --amp) ---------------------------------------

def test_bf16_autocast_step_0_wrapped_equals_unwrapped_to_bf16_rounding(family, one_thread):
    """Under the same bf16 autocast the wrapped model is as close to the fp32 embedding as the base is
    (README: identical on an AMD EPYC; on an Intel Xeon with AMX they differ by 0.4-0.8% of the largest
    magnitude, as much as each differs from fp32: the bf16 kernels round a longer sequence differently)."""
    base = make_tiny(family)
    wrapped = e2_adapter.wrap(copy.deepcopy(base), preset="gated")  # starts where the base is
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    encode = lambda m: e2_adapter.get_backend(m).encode_image(images).float()
    with torch.no_grad():
        fp32 = encode(base)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = encode(wrapped), encode(base)
    assert_close_relative(b, fp32, 2e-2, "bf16 autocast vs fp32")  # the rounding the README states
    assert_close_relative(a, fp32, 2e-2, "wrapped under bf16 autocast vs fp32")
    assert_close_relative(a, b, 2 * 2e-2, "bf16 autocast, wrapped vs unwrapped")  # two such roundings


# Each pipeline's own entry point into the encoder: DeCap and CapDec embed through the captioning
# encoders, CIReVL through its image / text functions, Pic2Word and SEARLE inject a pseudo-word
# (clip_benchmark calls encode_image / encode_text, tested above and in test_clip_benchmark.py).
def pipeline_outputs(model, images, tokenizer):
    from integrations.captioning import encoders
    from integrations.cir import cirevl, text_injection
    texts = ["a red wool coat", "a black silk dress"]
    prompt = tokenizer(["a photo of *"])
    star = text_injection.placeholder_token_id(tokenizer, "*")
    pseudo = torch.randn(1, text_injection.token_width(model), generator=torch.Generator().manual_seed(3)) * 0.02
    with torch.no_grad():
        return {
            "captioning images (DeCap, CapDec)": encoders.embed_images(model, images),
            "captioning texts (DeCap, CapDec)": encoders.embed_texts(model, tokenizer, texts),
            "CIReVL images": cirevl.encode_image(model, images).float(),
            "CIReVL texts": cirevl.encode_texts(model, tokenizer, texts),
            "pseudo-word text (Pic2Word, SEARLE)": text_injection.encode_text_with_pseudo_tokens(
                model, prompt, pseudo.to(e2_adapter.get_backend(model).parameter_dtype()), star).float(),
        }


@pytest.mark.parametrize("mode", ("openai-fp16-mixed", "data-parallel-replica"))
def test_every_pipeline_entry_point_runs_a_low_precision_or_replicated_wrapped_model(mode, images, monkeypatch,
                                                                                    one_thread):
    from e2_adapter.zoo import bpe_tokenizer, tiny_config
    tokenizer = bpe_tokenizer(tiny_config("tiny")["context_length"])
    if mode == "openai-fp16-mixed":
        reference, model, _, tol = wrapped_pair("openai-convert_weights-fp16", "faithful")
        tol *= 4  # the text tower and the injected token run in fp16 too
    else:
        reference = e2_adapter.wrap(make_tiny("openai"), preset="faithful")
        model, tol = replicate_on_cpu(reference, 2, monkeypatch)[1], 1e-5
    expected, actual = pipeline_outputs(reference, images, tokenizer), pipeline_outputs(model, images, tokenizer)
    for what, value in actual.items():
        assert value.shape == expected[what].shape and torch.isfinite(value).all(), what
        assert_close_relative(value, expected[what], tol, what)


# --- training half-precision weights (clip.load on CUDA hands them over in fp16) ---------------------

@pytest.mark.parametrize("family,convert", [("openai", openai_fp16), ("open_clip", open_clip_lp(torch.bfloat16))])
def test_half_precision_weights_train_as_fp32_masters(family, convert, fashionsynth, tmp_path, one_thread):
    """On a GPU, E2 training of an fp16 ``clip.load`` model stopped at "Attempting to unscale FP16
    gradients" (benchmarks/gpu_check.py): the optimizer and the fp16 GradScaler need fp32 parameters.
    The trainer keeps fp32 masters (autocast still computes in half) and says so."""
    from e2_adapter.data import FashionGenH5
    from e2_adapter.training.config import TrainConfig
    from e2_adapter.training.trainer import Trainer
    from e2_adapter.zoo import create_clip
    train, _ = fashionsynth(products=64, val_products=24, seed=0, image_size=32)
    bundle = create_clip(family, "tiny", seed=0)
    convert(bundle.model)
    cfg = TrainConfig(method="e2", batch_size=16, stage1_steps=1, stage2_steps=2, warmup_steps=1, amp="bf16",
                      log_every=1)
    with pytest.warns(UserWarning, match="half precision: training them as fp32"):
        trainer = Trainer(bundle.model, bundle.tokenizer, bundle.preprocess, FashionGenH5(train), None, cfg,
                          tmp_path, family, progress=False)
    adapter = e2_adapter.get_adapter(trainer.model)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    trainer.fit()
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert any(not torch.equal(before[k], v) for k, v in adapter.state_dict().items())
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(math.isfinite(v) for v in losses)
