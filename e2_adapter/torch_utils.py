"""Small torch helpers every layer uses, in one place: the device a model runs on, and evaluation
mode for the duration of a block."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn


def model_device(model: object) -> torch.device:
    """The device of ``model``'s first parameter; CPU for a model without any (or not a Module)."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: object, no_grad: bool = True) -> Iterator[object]:
    """Eval mode (and, by default, no autograd) for the duration, then every module's own training
    flag back: a frozen part may be in eval while the rest trains, so ``model.train(was)`` would not
    restore it. Eval mode matters for E2: its fusion blocks only sample Gumbel noise in training."""
    flags = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad() if no_grad else nullcontext():
            yield model
    finally:
        for m, was in flags:
            m.training = was
