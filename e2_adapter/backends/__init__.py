"""Backends by CLIP family. Adding a family is adding one file and one line here."""
from __future__ import annotations

from torch import nn

from .base import UnsupportedModelError, VisionBackend, describe
from .hf_clip import HFClipBackend
from .hf_siglip import HFSiglipBackend
from .hf_siglip2 import HFSiglip2Backend
from .open_clip import OpenClipBackend
from .open_clip_timm import OpenClipTimmBackend
from .openai_clip import OpenAIClipBackend

# Asked in this order: the narrower claims (a timm tower, a Siglip class) before their library's CLIP.
BACKENDS: dict[str, type[VisionBackend]] = {b.family: b for b in (
    OpenClipTimmBackend, OpenClipBackend, OpenAIClipBackend, HFSiglip2Backend, HFSiglipBackend, HFClipBackend)}


def unwrap_peft(model: nn.Module) -> nn.Module:
    """A peft PeftModel around a CLIP: the CLIP inside (LoRA layers stay where peft put them)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _summary(cls: type[VisionBackend]) -> str:
    return (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")


def backend_for(model: nn.Module) -> VisionBackend:
    """The backend of ``model``'s family, after checking E2 can be laid into it."""
    model = unwrap_peft(model)
    for cls in BACKENDS.values():
        if cls.claims(model):
            backend = cls(model)
            backend.check()
            return backend
    raise UnsupportedModelError(
        f"{describe(model)} is not a CLIP family e2-adapter knows; supported: "
        + "; ".join(f"{name}: {_summary(cls)}" for name, cls in BACKENDS.items()))


__all__ = ["BACKENDS", "VisionBackend", "UnsupportedModelError", "backend_for", "unwrap_peft"]
