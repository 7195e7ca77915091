"""Atomic checkpoints: write to a temporary file in the same folder, then rename over the old one,
so a crash at any moment leaves either the previous checkpoint or the new one, never half of one.

Checkpoints hold tensors and plain data only (the RNG states too), so they load with
``torch.load(weights_only=True)``: a crafted checkpoint cannot run code when resumed."""
from __future__ import annotations

import os
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_write

TMP_SUFFIX = ".tmp"


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return Path(path)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``folder`` (not recursive):
    ours are ``.<name>.<random>.tmp`` (``files.atomic_write``), and folders written by earlier
    versions may hold ``<name>.safetensors.tmp`` / ``<name>.json.tmp`` (adapter files)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and p.name.endswith(TMP_SUFFIX)
             and (p.name.startswith(".") or p.name.endswith((".safetensors.tmp", ".json.tmp")))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def rng_state() -> dict:
    """Every RNG the training loop draws from, as tensors and plain numbers."""
    np_state = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "python": {"version": py_version, "words": torch.tensor(py_words, dtype=torch.int64),
                        "gauss_next": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(w) for w in p["words"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from (unreadable, unsafe, or from another run)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds Python objects other than tensors and plain data: loading it could run code."""


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; nothing to resume (drop --resume to start fresh)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL \S+", str(err))
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain data "
            f"({found.group(0) if found else 'a pickled Python object'}), and unpickling them could run "
            f"code. Checkpoints written by this "
            f"version of e2-adapter never do; start afresh with --overwrite") from err
    except (RuntimeError, EOFError) as err:  # truncated or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path} ({str(err).splitlines()[0][:200]}); "
                                    "it is truncated or not a checkpoint; start afresh with --overwrite") from err
