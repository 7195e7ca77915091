"""Shared test code that is not a fixture: a stand-in class, an assertion helper, and the plain
builders behind conftest's factory fixtures (kept importable for files that still import them)."""
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

FAMILIES = ("open_clip", "openai", "hf")


def make_tiny(family: str, seed: int = 0):
    """A random-init tiny CLIP of ``family``, in eval mode (no download)."""
    from e2_adapter.zoo import create_clip
    return create_clip(family, "tiny", seed=seed).model.eval()


def random_images(clip, n=3, seed=0):
    """Random pixels of a ClipBundle's input size."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, clip.image_size, clip.image_size, generator=g)


def load_benchmark(name: str):
    """Import benchmarks/<name>.py (a script folder, not a package) as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class WrongWidth(nn.Module):
    """A CLIP-like encoder whose joint space is 32-d (a class to instantiate, so not a fixture)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 32)

    def encode_image(self, x):
        return self.proj(x.mean(dim=(2, 3)))

    def encode_text(self, tokens):
        return self.proj(torch.ones(len(tokens), 3))


def assert_swap_touches_no_weights(decoder: nn.Module, caption, encoders, images) -> None:
    """Captioning ``images`` with each encoder in turn (``caption(encoder, images)``) changes neither the
    decoder's state (a memory bank included) nor any encoder's: swapping is the encoder argument only.
    (An assertion with arguments: a function, not a fixture.)"""
    def snapshot(m):
        return {k: v.clone() for k, v in m.state_dict().items()}
    saved_decoder, saved_encoders = snapshot(decoder), [snapshot(m) for m in encoders]
    for encoder in encoders:
        caption(encoder, images)
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, saved_decoder[k]), k
    for m, saved in zip(encoders, saved_encoders):
        assert all(torch.equal(v, saved[k]) for k, v in m.state_dict().items())
