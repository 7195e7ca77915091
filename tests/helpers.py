"""Shared test code that is not a fixture: stand-in classes (a bag-of-words CLIP), an assertion helper, and the plain
builders behind conftest's factory fixtures (kept importable for files that still import them)."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
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


class BagOfWords(torch.nn.Module):
    """A fake CLIP whose image embedding is the bag of words of its product's oracle caption, so a
    perfect rewrite ranks the target first: checks the retrieval plumbing, not a model."""

    def __init__(self, tokenizer, captions_by_pixels):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(49408, 4)
        self.tokenizer, self.captions_by_pixels = tokenizer, captions_by_pixels

    def bag(self, tokens, size=4099):
        # Hashed bag of words: the target's bag equals a perfect rewrite's, so its cosine is 1.
        keep = (tokens > 0) & (tokens < 49406)
        return torch.zeros(len(tokens), size).scatter_add_(1, (tokens % size) * keep, keep.float())

    def encode_text(self, tokens):
        return self.bag(tokens)

    def encode_image(self, images):
        return self.bag(self.tokenizer([self.captions_by_pixels[im.numpy().tobytes()] for im in images]))


def pixels(image):
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
