"""Evaluate a saved E2 model with LAION's clip_benchmark (``pip install clip_benchmark``).

clip_benchmark picks a loader by ``--model_type`` from its registry (``clip_benchmark.models.TYPE2FUNC``:
name -> function(model_name, pretrained, cache_dir, device) returning (model, transform, tokenizer)).
This module adds the type ``e2``, whose ``--pretrained`` is a ``save_pretrained`` folder (a trainer's
``best/``), and runs clip_benchmark's own command line:

    python -m integrations.clip_benchmark_e2 eval --model_type e2 --pretrained runs/e2/best \\
        --dataset cifar10 --dataset_root data/cifar10 --output cifar10_e2.json

Every other flag is clip_benchmark's. ``--model`` is ignored for ``e2`` (the folder names its own base
model). clip_benchmark names its result file after ``--pretrained``, which for a folder is a path, so
without ``--output`` this command writes ``{dataset}_e2_{language}_{task}.json``.

From Python, ``register()`` adds the type to an imported clip_benchmark; ``load_e2`` is the loader.
Under clip_benchmark's default ``--amp`` the model runs under autocast (bf16 on CPU, fp16 on CUDA), so
an E2 model at step 0 equals its base only up to that format's rounding (see the README).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

MODEL_TYPE = "e2"
DEFAULT_OUTPUT = "{dataset}_e2_{language}_{task}.json"


class BenchmarkModel(nn.Module):
    """The two calls clip_benchmark makes, ``encode_image(images)`` and ``encode_text(tokens)``, for a
    CLIP of any family e2-adapter knows (transformers' CLIPModel has neither method of its own)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        from e2_adapter.wrap import get_backend
        return get_backend(self.model).encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        from e2_adapter.wrap import get_backend
        return get_backend(self.model).encode_text(tokens)


def load_e2(model_name: str | None = None, pretrained: str | None = None, cache_dir: str | None = None,
            device: str | torch.device = "cpu") -> tuple[nn.Module, Callable, Callable]:
    """clip_benchmark's loader contract: (model, transform, tokenizer) for the saved model in the folder
    ``pretrained`` (``save_pretrained``'s format, or an older trainer's ``best/`` is refused with the
    reason). ``model_name`` and ``cache_dir`` are accepted and unused: the folder is self-describing."""
    from e2_adapter.loading import encoder_namespace, load_encoder
    from e2_adapter.pretrained import CONFIG_FILE, is_pretrained_dir

    if not pretrained:
        raise ValueError("clip_benchmark --model_type e2 needs --pretrained FOLDER (a save_pretrained folder "
                         f"with {CONFIG_FILE})")
    if not Path(pretrained).is_dir():
        raise FileNotFoundError(f"--pretrained {pretrained}: no such folder (expected a save_pretrained folder "
                                f"with {CONFIG_FILE})")
    if not is_pretrained_dir(pretrained):
        from e2_adapter.pretrained import read_config
        read_config(pretrained)  # raises the error that says what the folder lacks
    bundle = load_encoder(encoder_namespace({"checkpoint": str(pretrained)}), device=device)
    if bundle.preprocess is None:
        raise ValueError(f"{pretrained}: the saved model has no image transform for clip_benchmark to use")
    model = BenchmarkModel(bundle.model).to(device).eval()
    return model, bundle.preprocess, bundle.tokenizer


def register() -> None:
    """Add ``--model_type e2`` to clip_benchmark's registry (idempotent). The CLI's ``--model_type``
    choices are the registry's ``MODEL_TYPES`` list itself, so this must run before its parser is used."""
    try:
        from clip_benchmark import models
    except ImportError:
        raise ImportError("clip_benchmark is not installed: pip install clip_benchmark") from None
    if not hasattr(models, "TYPE2FUNC") or not hasattr(models, "MODEL_TYPES"):
        raise ImportError("this clip_benchmark has no TYPE2FUNC / MODEL_TYPES model registry (it has been "
                          "there since 1.4; tested with 1.6.2)")
    models.TYPE2FUNC[MODEL_TYPE] = load_e2
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)


def with_default_output(argv: list[str]) -> list[str]:
    if argv and argv[0] == "eval" and not any(a == "--output" or a.startswith("--output=") for a in argv):
        return [*argv, "--output", DEFAULT_OUTPUT]
    return argv


def main(argv: list[str] | None = None) -> None:
    """clip_benchmark's command line with ``--model_type e2`` registered."""
    register()
    from clip_benchmark import cli
    argv = with_default_output(list(sys.argv[1:] if argv is None else argv))
    saved = sys.argv
    sys.argv = [saved[0] if saved else "clip_benchmark", *argv]  # its parser reads sys.argv
    try:
        cli.main()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
