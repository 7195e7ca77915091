"""Text-only DeCap training: captions -> frozen ``encode_text`` (once) -> decoder; fills the memory bank."""
from __future__ import annotations

from typing import Sequence

import torch

from integrations.captioning.encoders import ClipLike, TextTokenizerFn
from integrations.captioning.training import caption_embeddings, fit

from .model import DeCap


def train_decap(model: DeCap, encoder: ClipLike, clip_tokenizer: TextTokenizerFn, captions: Sequence[str], *,
                epochs: int = 10, batch_size: int = 64, lr: float = 1e-5, warmup_steps: int = 1000,
                max_steps: int | None = None, memory_size: int | None = None,
                text_embeddings: torch.Tensor | None = None, encoder_name: str | None = None,
                seed: int = 0, log_every: int = 0) -> list[float]:
    """Train ``model`` on ``captions`` embedded by ``encoder``'s text tower; returns per-step losses.

    The same embeddings (computed once, or passed as ``text_embeddings``) become the memory bank:
    all of them, or ``memory_size`` drawn at random (DeCap samples 500k of its corpus). Defaults
    follow DeCap: 10 epochs, batch 64, lr 1e-5, 1000 warm-up steps.
    """
    text_embeddings = caption_embeddings(model, encoder, clip_tokenizer, captions, text_embeddings, encoder_name)
    generator = torch.Generator().manual_seed(seed)
    if memory_size is not None and memory_size < len(text_embeddings):
        model.set_memory(text_embeddings[torch.randperm(len(text_embeddings), generator=generator)[:memory_size]])
    else:
        model.set_memory(text_embeddings)
    ids = model.encode_captions(captions)
    device = model.device

    def step_loss(batch: torch.Tensor) -> torch.Tensor:
        return model.loss(text_embeddings[batch].to(device), ids[batch].to(device))

    return fit(model, len(captions), step_loss, epochs=epochs, batch_size=batch_size, lr=lr,
               warmup_steps=warmup_steps, max_steps=max_steps, seed=seed, log_every=log_every, name="decap")
