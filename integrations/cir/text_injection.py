"""Pseudo-word injection into a CLIP text tower (Pic2Word / SEARLE textual inversion).

A prompt such as "a photo of $ that is red" is tokenized as usual; the embedding of the placeholder
token "$" is then replaced by a vector predicted from an image, and the rest of the text tower runs
unchanged. We do the replacement with a forward hook on the tower's token-embedding table that lives
only for one ``encode_text`` call: the family backend's own ``encode_text`` then runs exactly as it
always does (positional embedding, attention mask, pooling, projection, dtype casts), so a prompt
without the placeholder encodes bit-for-bit like ``get_backend(model).encode_text`` and no tower code
is duplicated here.

Where the token-embedding table sits is the backend's ``token_embedding()`` (``e2_adapter.backends``):
a family that supports injection says so there, not here.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from e2_adapter.backends import UnsupportedModelError, VisionBackend
from e2_adapter.wrap import clip_towers, get_backend

PLACEHOLDER = "$"  # SEARLE's placeholder; CLIP BPE id 259. Pic2Word writes "*" (id 265).


def text_backend(model: nn.Module) -> VisionBackend:
    """The family backend of ``model``; a clear error for models we cannot inject into."""
    try:
        backend = get_backend(model)
        backend.token_embedding()
    except (UnsupportedModelError, NotImplementedError) as err:
        raise TypeError(f"cannot inject pseudo tokens into {type(model).__module__}.{type(model).__name__}: "
                        f"{err}") from err
    return backend


def token_width(model: nn.Module) -> int:
    """Width of the text tower's token embeddings (the size a pseudo token must have)."""
    return text_backend(model).token_embedding().embedding_dim


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The family's ordinary text encoding, ``[B, D]`` (HF CLIPModel has no ``encode_text``)."""
    return clip_towers(model).encode_text(tokens)


def placeholder_token_id(tokenizer: Callable[[list[str]], torch.Tensor], placeholder: str = PLACEHOLDER) -> int:
    """Id of ``placeholder`` under ``tokenizer``; it must be a single BPE token."""
    ids = tokenizer([placeholder])[0].tolist()
    # CLIP tokenizers wrap text in start/end tokens and pad with 0; what is left is the word.
    body = [i for i in ids[1:] if i != 0]
    body = body[:-1] if body else body
    if len(body) != 1:
        raise ValueError(f"placeholder {placeholder!r} is {len(body)} tokens under this tokenizer "
                         f"({body}); choose a string that is one token, e.g. '$' or '*'")
    return body[0]


def placeholder_positions(tokens: torch.Tensor, placeholder_id: int) -> torch.Tensor:
    """Per row, the index of the first placeholder token, or -1 where the row has none."""
    hits = tokens == placeholder_id
    first = hits.int().argmax(dim=1)
    return torch.where(hits.any(dim=1), first, torch.full_like(first, -1))


@contextmanager
def injected(model: nn.Module, tokens: torch.Tensor, pseudo_tokens: torch.Tensor,
             placeholder_id: int) -> Iterator[None]:
    """Within the block, the text tower's embedding of ``tokens`` has the first placeholder of
    row i replaced by ``pseudo_tokens[i]``. Rows without a placeholder are left untouched."""
    table = text_backend(model).token_embedding()
    if pseudo_tokens.dim() != 2 or pseudo_tokens.shape[0] != tokens.shape[0]:
        raise ValueError(f"pseudo_tokens must be [B, width] with B = {tokens.shape[0]} prompts, "
                         f"got shape {tuple(pseudo_tokens.shape)}")
    if pseudo_tokens.shape[1] != table.embedding_dim:
        raise ValueError(f"pseudo tokens have width {pseudo_tokens.shape[1]} but this text tower's "
                         f"token embeddings have width {table.embedding_dim}; the mapping network "
                         "was built for another model")
    positions = placeholder_positions(tokens, placeholder_id)
    rows = torch.nonzero(positions >= 0).squeeze(1)
    cols = positions[rows]

    def replace(module, inputs, output):
        # The backend may drop the padding after the last end token (never a placeholder) first.
        ids = inputs[0]
        if ids.shape[0] != tokens.shape[0] or not torch.equal(ids, tokens[:, :ids.shape[1]]):
            raise RuntimeError("token embedding was called with other tokens than the injected prompt")
        output = output.clone()  # the table's output may be reused by autograd; do not edit in place
        output[rows, cols] = pseudo_tokens[rows].to(output.dtype)
        return output

    handle = table.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def encode_text_with_pseudo_tokens(model: nn.Module, tokens: torch.Tensor, pseudo_tokens: torch.Tensor,
                                   placeholder_id: int) -> torch.Tensor:
    """``encode_text(tokens)`` with each row's placeholder embedding replaced by its pseudo token.

    Gradients flow into ``pseudo_tokens`` (the towers can stay frozen), which is how the mapping
    network is trained.
    """
    with injected(model, tokens, pseudo_tokens, placeholder_id):
        return encode_text(model, tokens)
