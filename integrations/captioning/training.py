"""The loop both captioners train with: shuffled mini-batches of caption indices, AdamW, and a
linear warm-up then linear decay of the learning rate, no weight decay (what CapDec and DeCap use)."""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

log = logging.getLogger(__name__)


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    def scale(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)


def fit(model: torch.nn.Module, n_items: int, step_loss: Callable[[torch.Tensor], torch.Tensor],
        *, epochs: int, batch_size: int, lr: float, warmup_steps: int, max_steps: int | None = None,
        weight_decay: float = 0.0, seed: int = 0, log_every: int = 0, name: str = "train") -> list[float]:
    """Run ``step_loss(indices)`` on shuffled batches and return the loss of every step.

    Runs ``epochs`` passes over the items, or exactly ``max_steps`` steps when that is given.
    The warm-up is capped at a tenth of the run, so short runs (tests, small corpora) still
    reach the full learning rate. ``model`` is in train mode during the run and in eval mode after.
    """
    model.train()
    try:
        return _fit(model, n_items, step_loss, epochs=epochs, batch_size=batch_size, lr=lr,
                    warmup_steps=warmup_steps, max_steps=max_steps, weight_decay=weight_decay, seed=seed,
                    log_every=log_every, name=name)
    finally:
        model.eval()


def _fit(model, n_items, step_loss, *, epochs, batch_size, lr, warmup_steps, max_steps, weight_decay, seed,
         log_every, name) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    steps_per_epoch = math.ceil(n_items / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else max_steps  # max_steps overrides epochs
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = linear_warmup_decay(optimizer, min(warmup_steps, total // 10), total)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    while len(losses) < total:
        order = torch.randperm(n_items, generator=generator)
        for start in range(0, n_items, batch_size):
            loss = step_loss(order[start:start + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if log_every and len(losses) % log_every == 0:
                log.info("%s step %d/%d loss %.4f", name, len(losses), total, losses[-1])
            if len(losses) >= total:
                break
    return losses


def caption_embeddings(model, encoder, clip_tokenizer, captions, text_embeddings=None, encoder_name=None):
    """The frozen encoder's embeddings of ``captions`` (computed unless given), checked against the
    decoder's width; records which encoder the decoder is trained with."""
    from .encoders import check_width, embed_texts
    if text_embeddings is None:
        text_embeddings = embed_texts(encoder, clip_tokenizer, captions)
    if len(text_embeddings) != len(captions):
        raise ValueError(f"{len(text_embeddings)} embeddings for {len(captions)} captions")
    check_width(model.config.embed_dim, text_embeddings.shape[-1])
    if encoder_name is not None:
        model.config.encoder = encoder_name
    return text_embeddings
