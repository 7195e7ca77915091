"""Text-only CapDec training: captions -> frozen ``encode_text`` (once) -> noise -> mapper -> GPT-2."""
from __future__ import annotations

from typing import Sequence

import torch

from integrations.captioning.encoders import ClipLike, TextTokenizerFn
from integrations.captioning.training import caption_embeddings, fit

from .model import CapDec, inject_noise


def train_capdec(model: CapDec, encoder: ClipLike, clip_tokenizer: TextTokenizerFn, captions: Sequence[str], *,
                 epochs: int = 10, batch_size: int = 34, lr: float = 2e-5, warmup_steps: int = 5000,
                 max_steps: int | None = None, max_caption_tokens: int | None = None,
                 text_embeddings: torch.Tensor | None = None, encoder_name: str | None = None,
                 seed: int = 0, log_every: int = 0, modality_offset: torch.Tensor | None = None) -> list[float]:
    """Train ``model`` on ``captions`` embedded by ``encoder``'s text tower; returns per-step losses.

    The encoder stays frozen; its embeddings are computed once (or passed as ``text_embeddings``,
    normalised [N, D] rows matching ``captions``). Defaults follow CapDec: 10 epochs, batch 34,
    lr 2e-5, 5000 warm-up steps, noise variance and shape from the model's config;
    ``modality_offset`` ([D], CapDec's --add_modality_offset) is added to every noisy embedding.
    """
    text_embeddings = caption_embeddings(model, encoder, clip_tokenizer, captions, text_embeddings, encoder_name)
    ids, mask = model.encode_captions(captions, max_caption_tokens)
    device = model.device
    noise = torch.Generator().manual_seed(seed + 1)

    def step_loss(batch: torch.Tensor) -> torch.Tensor:
        noisy = inject_noise(text_embeddings[batch], model.config.noise_variance, generator=noise,
                             uniform=model.config.uniform_noise, modality_offset=modality_offset)
        return model.loss(noisy.to(device), ids[batch].to(device), mask[batch].to(device))

    return fit(model, len(captions), step_loss, epochs=epochs, batch_size=batch_size, lr=lr,
               warmup_steps=warmup_steps, max_steps=max_steps, seed=seed, log_every=log_every, name="capdec")
