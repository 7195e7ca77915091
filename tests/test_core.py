"""wrap / unwrap / encode_image_regions / save / load on every CLIP family (tiny random models)."""
import copy
import pickle

import pytest
import torch

import e2_adapter
from e2_adapter import E2Config


def backend(model):
    return e2_adapter.get_backend(model)


def test_shapes_dtype_and_drop_in_encode_image(family, images, make_tiny):
    model = e2_adapter.wrap(make_tiny(family), preset="faithful")
    out = e2_adapter.encode_image_regions(model, images)
    assert out.image.shape == (3, 64) and out.image.dtype == torch.float32
    assert set(out.regions) == set(e2_adapter.DEFAULT_ENTITIES)
    assert all(v.shape == (3, 64) for v in out.regions.values())
    assert out.selections.shape == (3, 2, 8)  # two fusion blocks, 4 entities x 2 tokens
    assert torch.equal(backend(model).encode_image(images), out.image)  # the family's own call
    # the last block saw CLS + 8 tokens only
    assert out.tokens.shape[1] == 1 + 8


def test_gradients_reach_every_adapter_parameter(family, images, make_tiny):
    model = e2_adapter.wrap(make_tiny(family)).train()
    out = e2_adapter.encode_image_regions(model, images)
    loss = out.image.pow(2).sum() + sum(v.pow(2).sum() for v in out.regions.values())
    loss.backward()
    for name, p in e2_adapter.get_adapter(model).named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_selections_one_hot_and_deterministic_in_eval(family, images, make_tiny):
    model = e2_adapter.wrap(make_tiny(family)).eval()
    a = e2_adapter.encode_image_regions(model, images)
    b = e2_adapter.encode_image_regions(model, images)
    assert torch.equal(a.selections, b.selections) and torch.equal(a.image, b.image)
    num_patches = 16
    assert a.selections.min() >= 0 and a.selections.max() < num_patches
    # the hard choice is exactly one-hot: the fused token is (value(patch) + token) / 2 for one patch
    fusion = e2_adapter.get_adapter(model).fusions[0]
    tokens, patches = torch.randn(2, 8, 64), torch.randn(2, 16, 64)
    fused, idx = fusion(tokens, patches)
    expected = (fusion.value(patches[torch.arange(2)[:, None], idx]) + tokens) / 2
    assert torch.allclose(fused, expected, atol=1e-6)


def test_training_selection_is_stochastic_but_hard(family, images, make_tiny):
    model = e2_adapter.wrap(make_tiny(family)).train()
    fusion = e2_adapter.get_adapter(model).fusions[0]
    tokens, patches = torch.randn(4, 8, 64), torch.randn(4, 16, 64)
    torch.manual_seed(0)
    picks = {tuple(fusion(tokens, patches, tau=5.0)[1].flatten().tolist()) for _ in range(5)}
    assert len(picks) > 1  # Gumbel noise in training only


def test_last_block_sees_only_tokens_and_cls(family, images, make_tiny):
    model = e2_adapter.wrap(make_tiny(family), preset="faithful")
    b = backend(model)
    seen = []
    blocks = b.tower.transformer.resblocks if family != "hf" else b.tower.encoder.layers
    blocks[-1].register_forward_pre_hook(lambda m, args, kwargs=None: seen.append(args[0].shape), with_kwargs=False)
    blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    b.encode_image(images)
    first, last = seen
    lengths = {s for s in first if s != 64}
    assert 1 + 8 + 16 in lengths  # block 1: CLS + tokens + 16 patches
    assert 1 + 8 in {s for s in last if s != 64}  # last block: CLS + tokens


def test_unwrap_restores_exact_original(family, images, make_tiny):
    model = make_tiny(family)
    original = copy.deepcopy(model)
    keys = set(model.state_dict())
    e2_adapter.wrap(model)
    assert e2_adapter.is_wrapped(model)
    e2_adapter.unwrap(model)
    assert not e2_adapter.is_wrapped(model) and set(model.state_dict()) == keys
    assert torch.equal(backend(model).encode_image(images), backend(original).encode_image(images))


def test_save_load_round_trip(family, images, tmp_path, make_tiny):
    model = e2_adapter.wrap(make_tiny(family), entities=("brand", "composition"))
    with torch.no_grad():
        for p in e2_adapter.get_adapter(model).parameters():
            p.add_(0.01 * torch.randn_like(p))
    e2_adapter.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    other = e2_adapter.load_adapter(make_tiny(family), tmp_path / "adapter")
    a, b = e2_adapter.encode_image_regions(model, images), e2_adapter.encode_image_regions(other, images)
    assert torch.equal(a.image, b.image) and set(b.regions) == {"brand", "composition"}
    assert all(torch.equal(a.regions[k], b.regions[k]) for k in a.regions)


def test_load_mismatch_is_clear_and_leaves_model_untouched(tmp_path, make_tiny):
    model = e2_adapter.wrap(make_tiny("open_clip"))
    e2_adapter.save_adapter(model, tmp_path / "a")
    from e2_adapter.zoo import create_clip
    wider = create_clip("open_clip", "small").model
    with pytest.raises(e2_adapter.AdapterMismatchError, match="width"):
        e2_adapter.load_adapter(wider, tmp_path / "a")
    assert not e2_adapter.is_wrapped(wider)
    with pytest.raises(e2_adapter.AdapterMismatchError, match="family"):
        e2_adapter.load_adapter(make_tiny("openai"), tmp_path / "a")
    other_entities = e2_adapter.wrap(make_tiny("open_clip"), entities=("brand",))
    with pytest.raises(e2_adapter.AdapterMismatchError, match="entities"):
        e2_adapter.load_adapter(other_entities, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        e2_adapter.load_adapter(make_tiny("open_clip"), tmp_path / "missing")


@pytest.mark.parametrize("bad, match", [
    (dict(entities=()), "empty"),
    (dict(entities=("brand", "brand")), "repeats"),
    (dict(entities="brand"), "string"),
    (dict(tokens_per_entity=0), "tokens_per_entity"),
    (dict(fusion_after=(9,)), "fusion_after"),
])
def test_bad_config_raises(bad, match, make_tiny):
    model = make_tiny("open_clip")
    with pytest.raises(ValueError, match=match):
        e2_adapter.wrap(model, **bad)
    assert not e2_adapter.is_wrapped(model)


def test_wrap_twice_and_unknown_family_raise(make_tiny):
    model = e2_adapter.wrap(make_tiny("open_clip"))
    with pytest.raises(ValueError, match="already wrapped"):
        e2_adapter.wrap(model)
    with pytest.raises(e2_adapter.UnsupportedModelError, match="not a CLIP family"):
        e2_adapter.wrap(torch.nn.Linear(3, 3))
    with pytest.raises(e2_adapter.NotWrappedError):
        e2_adapter.unwrap(make_tiny("openai"))


def test_unsupported_towers_are_refused_with_reason():
    import open_clip
    resnet = open_clip.CLIP(embed_dim=32, vision_cfg=dict(layers=(1, 1, 1, 1), width=8, image_size=32),
                            text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))
    with pytest.raises(e2_adapter.UnsupportedModelError, match="ResNet"):
        e2_adapter.wrap(resnet)
    # attention-pooled towers are supported now (tests/test_siglip.py); CoCa's token output is not
    coca_like = open_clip.CLIP(embed_dim=32, vision_cfg=dict(layers=2, width=32, head_width=16, patch_size=8,
                                                             image_size=32, attentional_pool=True, output_tokens=True),
                               text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1))
    with pytest.raises(e2_adapter.UnsupportedModelError, match="output_tokens"):
        e2_adapter.wrap(coca_like)


def test_fusion_positions_follow_depth():
    cfg = E2Config()
    assert cfg.resolve_fusion_after(12) == (8, 11)
    assert cfg.resolve_fusion_after(24) == (16, 23)
    assert cfg.resolve_fusion_after(6) == (4, 5)
    assert E2Config(fusion_after=(3, 6)).resolve_fusion_after(6) == (3, 6)


def test_config_round_trip(tmp_path):
    cfg = E2Config.from_preset("lean", entities=("brand",), tokens_per_entity=3)
    cfg.save(tmp_path)
    assert E2Config.load(tmp_path) == cfg


def test_global_projection_starts_from_pretrained(family, images, make_tiny):
    """Heads start as copies of the model's final norm + projection; the global path is CLIP's own."""
    model = e2_adapter.wrap(make_tiny(family))
    b = backend(model)
    adapter = e2_adapter.get_adapter(model)
    assert torch.equal(adapter.heads.projs["brand"].weight.t(), b.projection_weight())


def test_gated_preset_starts_exactly_where_clip_is(family, images, make_tiny):
    model = make_tiny(family)
    before = backend(model).encode_image(images)
    e2_adapter.wrap(model, preset="gated")
    after = backend(model).encode_image(images)
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()
    # ... and it can move away: the gate gets a gradient through the global embedding
    model.train()
    backend(model).encode_image(images).pow(2).sum().backward()
    assert e2_adapter.get_adapter(model).gate.grad.abs().sum() > 0


def test_default_is_auto_everywhere_faithful_for_a_class_token_tower(images, make_tiny):
    """wrap(), a bare E2Config and the trainer agree on the default, "auto", which wrap decides from the
    tower: the paper's faithful layout for a class-token tower (a pooling tower: tests/test_siglip.py)."""
    from e2_adapter.training.config import TrainConfig
    assert e2_adapter.E2Config().preset == TrainConfig().adapter.preset == "auto"
    config = e2_adapter.get_adapter(e2_adapter.wrap(make_tiny("open_clip"))).config
    assert config.preset == "faithful" and config.drop_patches and not config.gated
    assert not e2_adapter.E2Config.from_preset("faithful").gated and not e2_adapter.E2Config.from_preset("lean").gated
    # a layout field given with auto decides it; a contradiction is still an error
    assert e2_adapter.E2Config(gated=True).preset == "gated"
    assert e2_adapter.E2Config(drop_patches=True).preset == "faithful"
    with pytest.raises(ValueError, match="gated=False contradicts preset 'gated'"):
        e2_adapter.E2Config(gated=False, drop_patches=False)  # gated's layout without its gate


def test_gated_preset_starts_where_clip_is(images, make_tiny):
    model = make_tiny("open_clip")
    before = backend(model).encode_image(images)
    assert e2_adapter.get_adapter(e2_adapter.wrap(model, preset="gated")).config.gated
    assert torch.allclose(before, backend(model).encode_image(images), atol=1e-5)


def test_faithful_preset_differs_from_clip_at_step_0(images, make_tiny):
    model = make_tiny("open_clip")
    before = backend(model).encode_image(images)
    e2_adapter.wrap(model, preset="faithful")
    assert not torch.allclose(before, backend(model).encode_image(images), atol=1e-4)


def test_lean_preset_shrinks_fusion():
    from e2_adapter.zoo import create_clip
    full = e2_adapter.count_parameters(e2_adapter.wrap(create_clip("open_clip", "small").model))
    lean = e2_adapter.count_parameters(e2_adapter.wrap(create_clip("open_clip", "small").model, preset="lean"))
    assert lean["fusion"] < full["fusion"] and lean["heads"] == full["heads"]


def test_mark_only_adapter_trainable_and_report(capsys, make_tiny):
    model = e2_adapter.wrap(make_tiny("open_clip"))
    e2_adapter.mark_only_adapter_trainable(model)
    counts = e2_adapter.count_parameters(model)
    assert counts["trainable"] == counts["adapter"] == (counts["tokens"] + counts["fusion"] + counts["heads"]
                                                        + counts.get("gate", 0))
    line = e2_adapter.print_trainable_parameters(model)
    assert "trainable params:" in capsys.readouterr().out and "%" in line


def test_deepcopy_and_pickle(family, images, make_tiny):
    model = e2_adapter.wrap(make_tiny(family))
    expected = backend(model).encode_image(images)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert e2_adapter.is_wrapped(clone)
        assert torch.equal(backend(clone).encode_image(images), expected)
        # the clone's adapter is its own, not shared with the original
        assert e2_adapter.get_adapter(clone) is not e2_adapter.get_adapter(model)


def test_new_parameters_follow_model_dtype(images, make_tiny):
    model = make_tiny("open_clip").to(torch.bfloat16)  # OpenAI clip's own LayerNorm needs fp32 weights on CPU
    e2_adapter.wrap(model)
    fp32 = copy.deepcopy(model).float()  # the same (bf16-rounded) weights, computed in fp32
    assert all(p.dtype == torch.bfloat16 for p in e2_adapter.get_adapter(model).parameters())
    out = model.encode_image(images.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # The same computation in bf16: each embedding points where the fp32 one does (bf16 keeps ~3 digits).
    reference = fp32.encode_image(images.to(torch.bfloat16).float())
    cos = torch.nn.functional.cosine_similarity(out.float(), reference, dim=-1)
    assert (cos > 0.99).all(), cos


def test_open_clip_lnd_layout_matches_nld(images, make_tiny):
    from open_clip.transformer import Transformer
    model = make_tiny("open_clip")
    e2_adapter.wrap(model)
    expected = model.encode_image(images)
    nld = model.visual.transformer
    lnd = Transformer(width=64, layers=6, heads=2, batch_first=False)
    lnd.load_state_dict(nld.state_dict())
    model.visual.transformer = lnd.eval()
    assert torch.allclose(model.encode_image(images), expected, atol=1e-5)


def test_open_clip_gradient_checkpointing(images, make_tiny):
    model = e2_adapter.wrap(make_tiny("open_clip")).train()
    reference = copy.deepcopy(model)
    model.set_grad_checkpointing(True)
    torch.manual_seed(0)
    model.encode_image(images).sum().backward()
    torch.manual_seed(0)
    reference.encode_image(images).sum().backward()
    a, b = e2_adapter.get_adapter(model), e2_adapter.get_adapter(reference)
    assert torch.allclose(a.tokens.grad, b.tokens.grad, atol=1e-5)


def test_torch_compile(images, make_tiny):
    model = e2_adapter.wrap(make_tiny("open_clip"))
    expected = model.encode_image(images)
    compiled = torch.compile(model.encode_image, backend="eager")
    assert torch.allclose(compiled(images), expected, atol=1e-5)


def test_no_fusion_ablation_keeps_patches_and_selects_nothing(images, make_tiny):
    model = e2_adapter.wrap(make_tiny("open_clip"), fusion_after=())
    out = e2_adapter.encode_image_regions(model, images)
    assert out.selections.shape == (3, 0, 8) and out.tokens.shape[1] == 1 + 8 + 16
    assert len(e2_adapter.get_adapter(model).fusions) == 0


def _token_embedding(model, family):
    return model.text_model.embeddings.token_embedding if family == "hf" else model.token_embedding


def _full_context_text_embedding(model, family, tokens):
    """The family's own text embedding over the whole (padded) context: the reference."""
    if family != "hf":
        return model.encode_text(tokens)
    eot = model.config.text_config.eos_token_id
    first_end = (tokens == eot).int().argmax(-1, keepdim=True)
    mask = (torch.arange(tokens.shape[1])[None] <= first_end).long()
    out = model.get_text_features(input_ids=tokens, attention_mask=mask)
    return out if torch.is_tensor(out) else out.pooler_output


def test_backend_text_encoding_skips_padding_without_changing_embeddings(family):
    """Tag texts are a few tokens of a 77-token context: the backend runs only up to the last end token."""
    from e2_adapter.wrap import get_backend
    from e2_adapter.zoo import create_clip
    bundle = create_clip(family, "tiny", seed=0)
    model = bundle.model.eval()
    tokens = bundle.tokenizer(["FW2017", "black wool coat with a logo plaque at the chest", "x"])
    seen = []
    hook = _token_embedding(model, family).register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    with torch.no_grad():
        fast = get_backend(e2_adapter.wrap(model)).encode_text(tokens)
        hook.remove()
        reference = _full_context_text_embedding(model, family, tokens)
    longest = int((tokens != 0).sum(-1).max())  # start + words + end: the longest text's used positions
    assert seen == [longest] and longest < tokens.shape[1]
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-4)


def test_presets_fill_the_layout_and_contradictions_are_errors():
    from e2_adapter.config import E2Config
    lean = E2Config(preset="lean")  # the plain constructor applies the preset, as from_preset does
    assert (lean.gated, lean.drop_patches, lean.qk_rank) == (False, True, 32)
    assert E2Config(preset="lean").to_dict() == E2Config.from_preset("lean").to_dict()
    gated = E2Config.from_preset("gated")
    assert (gated.gated, gated.drop_patches, gated.qk_rank) == (True, False, None)
    with pytest.raises(ValueError, match="drop_patches=True contradicts preset 'gated'"):
        E2Config(preset="gated", drop_patches=True)
    with pytest.raises(ValueError, match="gated=True contradicts preset 'faithful'.*gated"):
        E2Config(preset="faithful", gated=True)
    # A version-1 config (gated, drop_patches written as True but never applied) loads as what ran.
    old = {**gated.to_dict(), "drop_patches": True, "version": 1}
    assert E2Config.from_dict(old).drop_patches is False
    assert E2Config.from_dict({**E2Config.from_preset("lean").to_dict(), "preset": "gated", "gated": False,
                               "version": 1}).preset == "lean"


def test_meta_model_wraps_on_meta_and_takes_real_weights_by_assign(family, images, make_tiny):
    # big-model loading: build and wrap without memory, then assign the trained weights, E2's included
    trained = e2_adapter.wrap(make_tiny(family), preset="faithful")
    from e2_adapter.zoo import create_clip
    empty = e2_adapter.wrap(create_clip(family, "tiny", seed=1, device="meta").model.eval(), preset="faithful")
    adapter = e2_adapter.get_adapter(empty)
    assert all(p.device.type == "meta" for p in adapter.parameters())
    empty.load_state_dict(trained.state_dict(), assign=True)
    for name, buffer in trained.named_buffers():  # not in a state dict (HF's position_ids): its loader rebuilds them
        if empty.get_buffer(name).device.type == "meta":
            owner, _, leaf = name.rpartition(".")
            empty.get_submodule(owner).register_buffer(leaf, buffer.clone(), persistent=False)
    backend = e2_adapter.get_backend
    assert torch.equal(backend(empty).encode_image(images), backend(trained).encode_image(images))
