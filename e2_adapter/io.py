"""Adapter files, in the layout peft users know: ``adapter_config.json`` + ``adapter_model.safetensors``
holding E2's parameters only (keys relative to the adapter, e.g. ``tokens``, ``fusions.0.query.weight``)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, E2Config
from .wrap import get_adapter, get_backend, is_wrapped, unwrap, wrap

WEIGHTS_NAME = "adapter_model.safetensors"


class AdapterMismatchError(ValueError):
    """An adapter does not fit the model it is being loaded into."""


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write E2's config and weights; each file is replaced atomically, so a crash leaves the old one."""
    adapter = get_adapter(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".safetensors.tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "library": "e2-adapter"})
        os.replace(tmp, directory / WEIGHTS_NAME)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    adapter.config.save(directory)
    return directory


def check_compatible(config: E2Config, model: nn.Module) -> None:
    """Raise AdapterMismatchError naming every field where ``config`` and ``model`` disagree."""
    backend = get_backend(model)
    found = {"family": backend.family, "width": backend.width, "embed_dim": backend.embed_dim,
             "num_blocks": backend.num_blocks}
    wrong = [f"{k}: adapter {getattr(config, k)} vs model {v}" for k, v in found.items()
             if getattr(config, k) is not None and getattr(config, k) != v]
    if is_wrapped(model):
        current = get_adapter(model).config
        for k in ("entities", "tokens_per_entity", "qk_rank", "gated"):
            if getattr(current, k) != getattr(config, k):
                wrong.append(f"{k}: adapter {getattr(config, k)} vs model's E2 {getattr(current, k)}")
    if wrong:
        raise AdapterMismatchError("adapter does not fit this model (" + "; ".join(wrong) + "); "
                                   "load it into the kind of model it was trained on")


def load_adapter(model: nn.Module, directory: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Wrap ``model`` (unless it already is) with the saved config and load the saved E2 weights.
    On any mismatch the model is left as it was (a wrap done here is undone)."""
    directory = Path(directory)
    config = E2Config.load(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    state = load_file(str(weights))
    check_compatible(config, model)
    wrapped_here = not is_wrapped(model)
    if wrapped_here:
        wrap(model, config=config)
    try:
        adapter = get_adapter(model)
        expected = adapter.state_dict()
        bad_shapes = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if bad_shapes or (strict and (missing or unexpected)):
            raise AdapterMismatchError(f"adapter weights in {weights} do not match: shapes differ for {bad_shapes}, "
                                       f"missing {missing}, unexpected {unexpected}")
        adapter.load_state_dict(state, strict=strict)
    except Exception:
        if wrapped_here:
            unwrap(model)
        raise
    return model
