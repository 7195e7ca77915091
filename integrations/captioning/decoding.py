"""Greedy and beam decoding for a GPT-2 language model that starts from prefix embeddings.

Both captioners end in the same place: a ``GPT2LMHeadModel`` given ``inputs_embeds`` = a prefix
computed from a CLIP embedding. Decoding reuses the model's key/value cache, so each step feeds
one token, not the whole sequence.
"""
from __future__ import annotations

import inspect
from typing import Collection

import torch
import torch.nn.functional as F
from torch import nn


def _step(lm: nn.Module, inputs: torch.Tensor, cache):
    """One forward pass with the key/value cache: (last-position logits, updated cache).

    transformers 5 names the cache ``cache``; 4.x (and its outputs) call it ``past_key_values``.
    """
    kwargs = {"inputs_embeds": inputs, "use_cache": True}
    if cache is not None:
        name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        kwargs[name] = cache
    out = lm(**kwargs)
    cache = getattr(out, "cache", None)
    return out.logits[:, -1], (out.past_key_values if cache is None else cache)


def _select_cache(past, index: torch.Tensor):
    """Keep the cache rows of ``index`` (beam re-ordering); Cache objects and legacy tuples."""
    if hasattr(past, "reorder_cache"):
        past.reorder_cache(index)
        return past
    return tuple(tuple(t.index_select(0, index) for t in layer) for layer in past)


def _check_length(lm: nn.Module, prefix: torch.Tensor, max_tokens: int) -> None:
    room = lm.config.n_positions - prefix.shape[1]
    if max_tokens > room:
        raise ValueError(f"prefix of {prefix.shape[1]} + {max_tokens} new tokens exceeds the language model's "
                         f"{lm.config.n_positions} positions; lower max_tokens to {room}")


def _trim(rows: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    return [row[: int(n)].tolist() for row, n in zip(rows, lengths)]


@torch.no_grad()
def greedy_decode(lm: nn.Module, prefix: torch.Tensor, max_tokens: int,
                  stop_ids: Collection[int]) -> list[list[int]]:
    """Most likely token at every step; each row stops at (and includes) its first stop token."""
    _check_length(lm, prefix, max_tokens)
    embed = lm.get_input_embeddings()
    stop = torch.tensor(sorted(stop_ids), device=prefix.device)
    batch = prefix.shape[0]
    tokens = torch.empty(batch, 0, dtype=torch.long, device=prefix.device)
    lengths = torch.full((batch,), max_tokens, device=prefix.device)
    inputs, cache = prefix, None
    for step in range(max_tokens):
        logits, cache = _step(lm, inputs, cache)
        nxt = logits.argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        just_stopped = torch.isin(nxt, stop) & (lengths == max_tokens)
        lengths[just_stopped] = step + 1
        if (lengths < max_tokens).all():
            break
        inputs = embed(nxt)[:, None]
    return _trim(tokens, lengths)


@torch.no_grad()
def beam_decode(lm: nn.Module, prefix: torch.Tensor, max_tokens: int, stop_ids: Collection[int],
                beam_size: int = 5) -> list[list[int]]:
    """Beam search ranked by mean token log-probability (CapDec's rule); the best beam per row.

    A finished beam stays in the beam with its score frozen: its only continuation is a stop token
    at log-probability 0, which keeps its length-normalised score unchanged.
    """
    _check_length(lm, prefix, max_tokens)
    embed = lm.get_input_embeddings()
    stop = torch.tensor(sorted(stop_ids), device=prefix.device)
    filler = int(stop[0])
    batch, k = prefix.shape[0], beam_size

    logits, cache = _step(lm, prefix, None)
    logp = F.log_softmax(logits.float(), dim=-1)  # [B, V]
    vocab = logp.shape[-1]
    if k > vocab:
        raise ValueError(f"beam_size {k} exceeds the vocabulary ({vocab})")
    scores, first = logp.topk(k, dim=-1)  # [B, K]: summed log-probabilities
    tokens = first.reshape(batch * k, 1)
    lengths = torch.ones(batch, k, device=prefix.device)
    done = torch.isin(first, stop)
    cache = _select_cache(cache, torch.arange(batch, device=prefix.device).repeat_interleave(k))
    row_base = torch.arange(batch, device=prefix.device)[:, None] * k

    for _ in range(1, max_tokens):
        if done.all():
            break
        logits, cache = _step(lm, embed(tokens[:, -1:]), cache)
        logp = F.log_softmax(logits.float(), dim=-1).view(batch, k, vocab)
        frozen_step = torch.full_like(logp, float("-inf"))
        frozen_step[..., filler] = 0.0
        logp = torch.where(done[..., None], frozen_step, logp)
        new_lengths = lengths + (~done).float()
        mean_logp = (scores[..., None] + logp) / new_lengths[..., None]
        best, flat = mean_logp.view(batch, k * vocab).topk(k, dim=-1)
        source, token = flat // vocab, flat % vocab
        lengths = new_lengths.gather(1, source)
        scores = best * lengths
        done = torch.isin(token, stop)  # the filler is a stop token, so finished beams stay finished
        rows = (row_base + source).view(-1)
        tokens = torch.cat([tokens[rows], token.view(-1, 1)], dim=1)
        cache = _select_cache(cache, rows)

    winner = (scores / lengths).argmax(-1)  # [B]
    rows = (torch.arange(batch, device=prefix.device) * k + winner)
    return _trim(tokens[rows], lengths.view(-1)[rows])
