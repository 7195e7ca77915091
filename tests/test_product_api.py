"""Using a trained model: save_pretrained / from_pretrained / load_encoder, classify, tag, index and
search, ONNX export. Tiny random models, generated data."""
import argparse
import json

import pytest
import torch

import e2_adapter
from e2_adapter.pretrained import CONFIG_FILE, WEIGHTS_FILE, PretrainedFormatError
from e2_adapter.zoo import create_clip

FAMILIES = ("open_clip", "openai", "hf")


def _perturbed(family, wrapped=True, seed=0):
    """A tiny CLIP whose weights are not the seed's init, so a reload cannot pass by re-initialising."""
    bundle = create_clip(family, "tiny", seed=seed)
    if wrapped:
        e2_adapter.wrap(bundle.model, entities=("brand", "season"))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in bundle.model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return bundle


def _outputs(bundle, images, texts):
    backend = e2_adapter.get_backend(bundle.model)
    with torch.no_grad():
        out = [backend.encode_image(images), backend.encode_text(bundle.tokenizer(texts))]
        if e2_adapter.is_wrapped(bundle.model):
            regions = e2_adapter.encode_image_regions(bundle.model, images)
            out += [regions.regions["brand"], regions.selections.float()]
    return out


# --- 1. one saved-model format and one loader --------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip_rebuilds_everything_from_the_folder(family, tmp_path, one_thread):
    bundle = _perturbed(family)
    bundle.model.eval()
    images, texts = torch.rand(2, 3, 32, 32), ["a red leather bag", "FW2017"]
    e2_adapter.save_pretrained(bundle.model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert config["family"] == family and config["base"]["model"] == "tiny" and config["image_size"] == 32
    assert config["adapter"]["entities"] == ["brand", "season"]
    assert (tmp_path / "m" / "adapter" / "adapter_model.safetensors").is_file()  # the adapter-only format too

    loaded = e2_adapter.from_pretrained(tmp_path / "m")
    assert loaded.family == family and loaded.image_size == 32 and not loaded.model.training
    assert e2_adapter.is_wrapped(loaded.model)
    for a, b in zip(_outputs(bundle, images, texts), _outputs(loaded, images, texts)):
        assert torch.equal(a, b)


def test_unwrapped_model_round_trips_without_adapter(tmp_path, one_thread):
    bundle = _perturbed("open_clip", wrapped=False)
    e2_adapter.save_pretrained(bundle.model, tmp_path)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["adapter"] is None
    loaded = e2_adapter.from_pretrained(tmp_path)
    assert not e2_adapter.is_wrapped(loaded.model)
    a, b = bundle.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_is_merged_into_the_saved_weights(tmp_path, one_thread):
    from peft import LoraConfig, get_peft_model
    bundle = _perturbed("open_clip")
    model = get_peft_model(bundle.model, LoraConfig(r=2, target_modules=["c_fc"], init_lora_weights=False)).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = e2_adapter.get_backend(model).encode_image(images)
    e2_adapter.save_pretrained(model, tmp_path)
    assert any("lora_" in n for n, _ in model.named_parameters())  # the trainer's model keeps its LoRA
    loaded = e2_adapter.from_pretrained(tmp_path)
    with torch.no_grad():
        got = e2_adapter.get_backend(loaded.model).encode_image(images)
    assert torch.allclose(expected, got, atol=1e-5)


def test_from_pretrained_errors_name_the_problem(tmp_path, one_thread):
    with pytest.raises(PretrainedFormatError, match="no e2_model.json"):
        e2_adapter.from_pretrained(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(PretrainedFormatError, match="older trainer's best"):
        e2_adapter.from_pretrained(tmp_path)
    bundle = _perturbed("open_clip", wrapped=False)
    e2_adapter.save_pretrained(bundle.model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    config["architecture"], config["base"]["model"] = {}, "small"  # weights no longer fit
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(PretrainedFormatError, match="does not match the architecture"):
        e2_adapter.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_FILE).unlink()
    with pytest.raises(PretrainedFormatError, match="no model.safetensors"):
        e2_adapter.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        e2_adapter.from_pretrained(tmp_path / "missing")


def test_save_pretrained_needs_to_know_the_base(tmp_path):
    from e2_adapter.zoo import SOURCE_ATTR
    bundle = create_clip("open_clip", "tiny", seed=0)
    object.__delattr__(bundle.model, SOURCE_ATTR)  # a model built by hand
    with pytest.raises(ValueError, match="does not know where this model came from"):
        e2_adapter.save_pretrained(bundle.model, tmp_path)


def _flags(**kw):
    base = dict(family="open_clip", model="tiny", pretrained=None, image_size=None, encoder_seed=0,
                checkpoint=None, adapter=None, factory=None)
    return argparse.Namespace(**{**base, **kw})


def test_load_encoder_reads_every_form(tmp_path, one_thread):
    bundle = _perturbed("openai")
    e2_adapter.save_pretrained(bundle.model, tmp_path / "m")
    # A save_pretrained folder names its own family: the (wrong) base flags are not consulted.
    loaded = e2_adapter.load_encoder(_flags(checkpoint=str(tmp_path / "m")))
    assert loaded.family == "openai" and e2_adapter.is_wrapped(loaded.model)

    # An older best/ folder (model.pt + adapter/) over the flags' base, and a .pt state dict.
    e2_adapter.save_adapter(bundle.model, tmp_path / "old" / "adapter")
    torch.save(bundle.model.state_dict(), tmp_path / "old" / "model.pt")
    old = e2_adapter.load_encoder(_flags(family="openai", checkpoint=str(tmp_path / "old")))
    images = torch.rand(2, 3, 32, 32)
    bundle.model.eval()
    for a, b in zip(_outputs(bundle, images, ["x"]), _outputs(old, images, ["x"])):
        assert torch.equal(a, b)
    plain = create_clip("hf", "tiny", seed=3).model
    torch.save(plain.state_dict(), tmp_path / "hf.pt")
    from_pt = e2_adapter.load_encoder(_flags(family="hf", pretrained=str(tmp_path / "hf.pt")))
    assert from_pt.source["pretrained"].startswith("sha256:")
    assert all(torch.equal(v, from_pt.model.state_dict()[k]) for k, v in plain.state_dict().items())

    with pytest.raises(ValueError, match="give one of --checkpoint, --adapter, --factory"):
        e2_adapter.load_encoder(_flags(checkpoint=str(tmp_path / "m"), adapter=str(tmp_path / "old" / "adapter")))
    with pytest.raises(PretrainedFormatError, match="no e2_model.json"):
        e2_adapter.load_encoder(_flags(checkpoint=str(tmp_path)))


def test_encoder_specs_are_parsed_the_same_everywhere(tmp_path):
    from e2_adapter.loading import parse_encoder_spec
    bundle = create_clip("open_clip", "tiny", seed=0)
    e2_adapter.save_pretrained(bundle.model, tmp_path / "m")
    assert parse_encoder_spec(str(tmp_path / "m"))["checkpoint"] == str(tmp_path / "m")
    assert parse_encoder_spec("pkg.mod:fn")["factory"] == "pkg.mod:fn"
    assert parse_encoder_spec("base") == {"checkpoint": None, "adapter": None, "factory": None}
    with pytest.raises(ValueError, match="not 'base'"):
        parse_encoder_spec(str(tmp_path / "nothing-here"))


def test_every_command_line_loads_a_checkpoint_through_load_encoder(tmp_path, one_thread):
    from e2_adapter.cli import build_parser
    from integrations.captioning.cli import encoder_from_spec
    from integrations.cir.cli import build_parser as cir_parser
    from integrations.cir.cli import load_encoder as cir_load
    bundle = _perturbed("open_clip")
    e2_adapter.save_pretrained(bundle.model, tmp_path / "m")
    expected = bundle.model.state_dict()

    def same(model):
        return all(torch.equal(v, model.state_dict()[k]) for k, v in expected.items())

    args = build_parser().parse_args(["eval", "--data", "x.h5", "--checkpoint", str(tmp_path / "m")])
    assert same(e2_adapter.load_encoder(args).model)
    args = cir_parser().parse_args(["eval", "--data", "d", "--method", "cirevl", "--checkpoint", str(tmp_path / "m"),
                                    "--device", "cpu"])
    assert same(cir_load(args).model)
    encoder, _, _, name = encoder_from_spec({"checkpoint": str(tmp_path / "m")})
    assert same(encoder) and name == str(tmp_path / "m")
