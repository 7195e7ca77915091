"""Captioner checkpoints: ``model.safetensors`` + ``config.json`` in one directory.

Each file is written to a temporary name in the same directory and moved into place with
``os.replace``, so a crash mid-save never leaves a half-written file under the real name.
The weights go first and the config last: a readable config means the weights beside it are whole.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from e2_adapter.files import atomic_write, atomic_write_json

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def write_json(path: str | Path, data: dict) -> None:
    atomic_write_json(path, data, sort_keys=True)


def read_json(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_checkpoint(directory: str | Path, module: nn.Module, config: dict) -> Path:
    """Save a module's state (tied weights handled by safetensors' ``save_model``) and its config."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_model(module, tmp))
    write_json(directory / CONFIG_NAME, config)
    return directory


def read_config(directory: str | Path, kind: str | None = None) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a saved captioner")
    config = read_json(path)
    if kind is not None and config.get("kind") != kind:
        raise ValueError(f"{directory} holds a {config.get('kind')!r} captioner, not {kind!r}")
    return config


def read_tensor(directory: str | Path, name: str) -> torch.Tensor:
    """One tensor of a saved checkpoint (what a module needs before it can be built)."""
    with safe_open(str(Path(directory) / WEIGHTS_NAME), framework="pt") as f:
        return f.get_tensor(name)


def load_weights(directory: str | Path, module: nn.Module) -> nn.Module:
    load_model(module, str(Path(directory) / WEIGHTS_NAME), strict=True)
    return module
