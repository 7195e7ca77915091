"""One saved-model format: a folder that rebuilds model, tokenizer and preprocess with no other arguments.

    save_pretrained(model, "runs/e2/best")      # e2_model.json + model.safetensors (+ adapter/)
    bundle = from_pretrained("runs/e2/best")     # ClipBundle: model (eval mode), tokenizer, preprocess, ...

``model.safetensors`` holds every weight of the model as it runs (both towers and, when wrapped, E2's
parameters under their usual ``<tower>.e2.`` keys); ``e2_model.json`` names the family, the base model
(zoo tiny config or the family's model name, its pretrained tag or the hash of the state dict it
started from), the image size, the tokenizer, the architecture's constructor arguments and the E2
config. Loading reads only JSON and safetensors, so a downloaded folder cannot run code. ``adapter/``
is the adapter-only format (``load_adapter``), kept beside it for sharing E2 over a known base.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .backends import unwrap_peft
from .config import E2Config
from .io import save_adapter
from .wrap import get_adapter, get_backend, is_wrapped, wrap
from .zoo import ClipBundle, architecture_of, build_architecture, remember_source, source_of
from .files import atomic_write, atomic_write_json

CONFIG_FILE = "e2_model.json"
WEIGHTS_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"
FORMAT = "e2-adapter/pretrained"
FORMAT_VERSION = 1


class PretrainedFormatError(ValueError):
    """A folder is not a save_pretrained folder, or its files disagree with each other."""


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _merged(model: nn.Module) -> nn.Module:
    """The model with any peft LoRA merged in, so the saved weights are a plain CLIP's (+ E2). A copy,
    since the trainer saves its best model mid-training and must keep its LoRA layers."""
    if callable(getattr(model, "merge_and_unload", None)):
        return copy.deepcopy(model).merge_and_unload()
    return unwrap_peft(model)


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, source: dict | None = None) -> Path:
    """Write ``model`` (wrapped or not, LoRA merged) as a folder ``from_pretrained`` rebuilds.

    ``source`` describes the base (``family``, ``model``, ``pretrained``, ``image_size``, ``tokenizer``);
    models made by ``e2_adapter.zoo.create_clip`` or ``from_pretrained`` carry it already.
    """
    source = source or source_of(model)
    if source is None:
        raise ValueError("save_pretrained does not know where this model came from: build it with "
                         "e2_adapter.zoo.create_clip (or from_pretrained), or pass source=dict(family=..., "
                         "model=..., pretrained=..., image_size=..., tokenizer=...)")
    plain = _merged(model)
    backend = get_backend(plain)
    family = backend.zoo_family or backend.family
    if family != source["family"]:
        raise ValueError(f"the model is a {family} CLIP but its source says {source['family']!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapter = get_adapter(plain).config.to_dict() if is_wrapped(plain) else None
    config = {"format": FORMAT, "version": FORMAT_VERSION, "family": family,
              "base": {"model": source["model"], "pretrained": source.get("pretrained")},
              "image_size": int(source["image_size"]), "tokenizer": source["tokenizer"],
              "architecture": architecture_of(plain, family), "adapter": adapter}
    state = {k: v.detach().contiguous().cpu().clone() for k, v in plain.state_dict().items()}
    atomic_write(directory / WEIGHTS_FILE,
                  lambda tmp: save_file(state, tmp, metadata={"format": "pt", "library": "e2-adapter"}))
    if adapter is not None:
        save_adapter(plain, directory / ADAPTER_DIR)
    # The config last: a folder with a config always has the weights that go with it.
    atomic_write_json(directory / CONFIG_FILE, config)
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        hint = (" It has model.pt: an older trainer's best/ folder; load it with the base model flags "
                "(--family/--model) and --checkpoint, or re-save it with save_pretrained."
                if (directory / "model.pt").is_file() else "")
        raise PretrainedFormatError(f"{directory} is not a save_pretrained folder: no {CONFIG_FILE}.{hint}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PretrainedFormatError(f"{path} is not valid JSON ({exc})") from None
    if config.get("format") != FORMAT:
        raise PretrainedFormatError(f"{path} is not an e2-adapter model config (format {config.get('format')!r})")
    if config.get("version", 0) > FORMAT_VERSION:
        raise PretrainedFormatError(f"{path} was written by a newer e2-adapter (format version "
                                    f"{config['version']} > {FORMAT_VERSION}); upgrade e2-adapter")
    missing = [k for k in ("family", "base", "image_size", "tokenizer", "architecture") if k not in config]
    if missing:
        raise PretrainedFormatError(f"{path} lacks {missing}")
    return config


def from_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu") -> ClipBundle:
    """Rebuild a model saved by ``save_pretrained`` (a local folder, or a Hugging Face Hub id when
    ``huggingface_hub`` is installed and the folder does not exist locally), in eval mode."""
    directory = resolve_location(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise PretrainedFormatError(f"{directory} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    base = config["base"]
    bundle = build_architecture(config["family"], base["model"], config["image_size"], config["architecture"],
                                config["tokenizer"])
    if config.get("adapter") is not None:
        wrap(bundle.model, config=E2Config.from_dict(config["adapter"]))
    state = load_file(str(weights))
    expected = bundle.model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    bad = [k for k in state if k in expected and expected[k].shape != state[k].shape]
    if missing or unexpected or bad:
        raise PretrainedFormatError(f"{weights} does not match the architecture in {CONFIG_FILE}: missing "
                                    f"{missing[:5]}, unexpected {unexpected[:5]}, shapes differ for {bad[:5]}")
    bundle.model.load_state_dict(state)
    remember_source(bundle.model, dict(family=config["family"], model=base["model"], pretrained=base.get("pretrained"),
                                       image_size=config["image_size"], tokenizer=config["tokenizer"]))
    bundle.model.to(device).eval()
    return bundle


def resolve_location(location: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a Hub id (``user/name``) downloaded with huggingface_hub.
    Only JSON and safetensors files are fetched. Not tested here: this machine has no internet."""
    path = Path(location)
    if path.exists() or str(location).count("/") != 1:
        if not path.is_dir():
            raise FileNotFoundError(f"{location}: no such folder (expected a save_pretrained folder)")
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{location}: no such folder, and huggingface_hub is not installed to "
                                "fetch it as a Hub id (pip install huggingface_hub)") from None
    return Path(snapshot_download(str(location), allow_patterns=["*.json", "*.safetensors"]))
