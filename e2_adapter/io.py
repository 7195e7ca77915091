"""Adapter files, in the layout peft users know: ``adapter_config.json`` + ``adapter_model.safetensors``
holding E2's parameters only (keys relative to the adapter, e.g. ``tokens``, ``fusions.0.query.weight``)."""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CONFIG_NAME, CONFIG_VERSION, E2Config
from .files import atomic_write
from .wrap import get_adapter, get_backend, is_wrapped, unwrap, wrap

WEIGHTS_NAME = "adapter_model.safetensors"
SUPPORTED_VERSIONS = tuple(range(1, CONFIG_VERSION + 1))  # adapter_config.json "version" values this code reads (1 is migrated)
BASE_HASH_KEY = "base_model_sha256"  # safetensors metadata: the base weights the adapter was saved with


class AdapterMismatchError(ValueError):
    """An adapter does not fit the model it is being loaded into."""


class AdapterFileError(ValueError):
    """An adapter file is unreadable, corrupt or from an unsupported version."""


class BaseModelMismatchWarning(UserWarning):
    """The adapter was saved on top of other base weights than the model it is loaded into."""


def base_model_hash(model: nn.Module) -> str:
    """SHA-256 of every weight of ``model`` that is not E2's, in state-dict order (names are left out,
    so a peft-wrapped model hashes like its base). Identifies the base checkpoint an adapter belongs to."""
    adapter = {t.data_ptr() for t in get_adapter(model).state_dict().values()} if is_wrapped(model) else set()
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in adapter or "lora_" in name:
            continue
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write E2's config and weights; each file is replaced atomically, so a crash leaves the old one."""
    adapter = get_adapter(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    metadata = {"format": "pt", "library": "e2-adapter", BASE_HASH_KEY: base_model_hash(model)}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata=metadata))
    adapter.config.save(directory)
    return directory


# E2Config fields that change the wrapped forward (fusion_after is compared once resolved to positions);
# the rest only set the initialisation (token_init), training (gumbel_tau), a label (preset) or the model.
FORWARD_FIELDS = ("entities", "tokens_per_entity", "drop_patches", "qk_rank", "gated")
NOT_FORWARD_FIELDS = ("fusion_after", "token_init", "gumbel_tau", "preset", "family", "width", "embed_dim",
                      "num_blocks", "version")


def read_config(directory: Path) -> E2Config:
    """adapter_config.json, with errors that name the file."""
    path = directory / CONFIG_NAME
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"adapter path {directory} is a file; pass the folder save_adapter() wrote")
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: is this an adapter saved by save_adapter()?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON ({err}); re-save the adapter with save_adapter()") from err
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, got {type(data).__name__}")
    version = data.get("version", 1)
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise AdapterFileError(f"{path}: adapter format version {version!r} is not supported (this e2-adapter "
                               f"reads {list(SUPPORTED_VERSIONS)}); upgrade e2-adapter or re-save the adapter")
    try:
        return E2Config.from_dict(data)
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{path}: {err}") from err


def read_weights(path: Path) -> tuple[dict, dict]:
    """The weights and metadata of adapter_model.safetensors; corrupt or non-finite files are errors."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for every malformed file
        raise AdapterFileError(f"cannot read adapter weights {path} ({err}); the file is truncated or not a "
                               "safetensors file: re-save the adapter with save_adapter()") from err
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise AdapterFileError(f"adapter weights {path} hold NaN or inf values in {bad[:5]}"
                               f"{' ...' if len(bad) > 5 else ''}; the training diverged: use an earlier adapter")
    return state, metadata


def check_compatible(config: E2Config, model: nn.Module) -> None:
    """Raise AdapterMismatchError naming every field where ``config`` and ``model`` disagree."""
    backend = get_backend(model)
    found = {"family": backend.family, "width": backend.width, "embed_dim": backend.embed_dim,
             "num_blocks": backend.num_blocks}
    wrong = [f"{k}: adapter {getattr(config, k)} vs model {v}" for k, v in found.items()
             if getattr(config, k) is not None and getattr(config, k) != v]
    if is_wrapped(model):
        current = get_adapter(model).config
        for k in FORWARD_FIELDS:
            if getattr(current, k) != getattr(config, k):
                wrong.append(f"{k}: adapter {getattr(config, k)} vs model's E2 {getattr(current, k)}")
        blocks = backend.num_blocks
        if current.resolve_fusion_after(blocks) != config.resolve_fusion_after(blocks):
            wrong.append(f"fusion_after: adapter {config.resolve_fusion_after(blocks)} vs model's E2 "
                         f"{current.resolve_fusion_after(blocks)}")
    if wrong:
        raise AdapterMismatchError("adapter does not fit this model (" + "; ".join(wrong) + "); "
                                   "load it into the kind of model it was trained on")


def load_adapter(model: nn.Module, directory: str | os.PathLike, strict: bool = True,
                 check_base: bool = True) -> nn.Module:
    """Wrap ``model`` (unless it already is) with the saved config and load the saved E2 weights.
    On any mismatch the model is left as it was (a wrap done here is undone).
    ``check_base``: warn (BaseModelMismatchWarning) when the model's base weights are not the ones the
    adapter was saved with; pass False when the matching base weights are loaded afterwards."""
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    state, metadata = read_weights(weights)
    check_compatible(config, model)
    saved_base = metadata.get(BASE_HASH_KEY)
    current_base = base_model_hash(model) if check_base and saved_base else None
    if current_base and saved_base != current_base:
        warnings.warn(f"the adapter in {directory} was saved on other base weights than this model's "
                      f"(base sha256 {saved_base[:12]}... vs {current_base[:12]}...): its embeddings "
                      "will differ from the trained ones. Load the base checkpoint it was trained with "
                      "(a trainer's best/model.pt holds it)", BaseModelMismatchWarning, stacklevel=2)
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
