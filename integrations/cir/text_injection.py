"""Pseudo-word injection into a CLIP text tower (Pic2Word / SEARLE textual inversion).

A prompt such as "a photo of $ that is red" is tokenized as usual; the embedding of the placeholder
token "$" is then replaced by a vector predicted from an image, and the rest of the text tower runs
unchanged. We do the replacement with a forward hook on the tower's token-embedding table that lives
only for one ``encode_text`` call: the family's own ``encode_text`` then runs exactly as it always
does (positional embedding, attention mask, pooling, projection, dtype casts), so a prompt without
the placeholder encodes bit-for-bit like ``model.encode_text`` and no tower code is duplicated here.

Families are entries of ``TEXT_TOWERS``: where the token-embedding table sits and how to call the
tower. Adding a family is adding one entry.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

PLACEHOLDER = "$"  # SEARLE's placeholder; CLIP BPE id 259. Pic2Word writes "*" (id 265).


@dataclass(frozen=True)
class TextTower:
    """How to reach one family's text tower."""
    matches: Callable[[nn.Module], bool]
    token_embedding: Callable[[nn.Module], nn.Embedding]
    encode: Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _has_path(model: nn.Module, path: str) -> bool:
    obj = model
    for name in path.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return isinstance(obj, nn.Embedding)


def _get_path(model: nn.Module, path: str) -> nn.Embedding:
    obj = model
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _hf_text_features(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model.get_text_features(input_ids=tokens)
    # transformers 5 returns a model output whose pooler_output is the projected feature.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model.encode_text(tokens)


def _module_root(model: nn.Module) -> str:
    return type(model).__module__.split(".")[0]


# Order matters: the first entry whose ``matches`` accepts the model is used.
TEXT_TOWERS: dict[str, TextTower] = {
    # open_clip.CLIP and OpenAI clip.model.CLIP keep the text tower on the model itself.
    "open_clip": TextTower(
        matches=lambda m: _module_root(m) == "open_clip" and _has_path(m, "token_embedding"),
        token_embedding=lambda m: m.token_embedding, encode=_encode_text),
    # open_clip.CustomTextCLIP with its own TextTransformer (not an HF text encoder).
    "open_clip_custom_text": TextTower(
        matches=lambda m: _module_root(m) == "open_clip" and _has_path(m, "text.token_embedding"),
        token_embedding=lambda m: m.text.token_embedding, encode=_encode_text),
    "openai": TextTower(
        matches=lambda m: _module_root(m) == "clip" and _has_path(m, "token_embedding"),
        token_embedding=lambda m: m.token_embedding, encode=_encode_text),
    "hf": TextTower(
        matches=lambda m: _has_path(m, "text_model.embeddings.token_embedding"),
        token_embedding=lambda m: m.text_model.embeddings.token_embedding,
        encode=lambda m, t: m.encode_text(t) if hasattr(m, "encode_text") else _hf_text_features(m, t)),
    # Any other CLIP-like model (e.g. a subclass in a user's package) exposing the same attributes.
    "generic": TextTower(
        matches=lambda m: hasattr(m, "encode_text") and _has_path(m, "token_embedding"),
        token_embedding=lambda m: m.token_embedding, encode=_encode_text),
}


def text_tower(model: nn.Module) -> TextTower:
    """The ``TextTower`` entry for ``model``; a clear error for towers we cannot inject into."""
    for tower in TEXT_TOWERS.values():
        if tower.matches(model):
            return tower
    raise TypeError(
        f"cannot inject pseudo tokens into {type(model).__module__}.{type(model).__name__}: no "
        f"token-embedding table found (supported: {', '.join(TEXT_TOWERS)}). Text towers built on "
        "an HF language model (open_clip hf-text configs) need their own TEXT_TOWERS entry.")


def token_width(model: nn.Module) -> int:
    """Width of the text tower's token embeddings (the size a pseudo token must have)."""
    return text_tower(model).token_embedding(model).embedding_dim


def encode_text(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The family's ordinary text encoding, ``[B, D]`` (HF CLIPModel has no ``encode_text``)."""
    return text_tower(model).encode(model, tokens)


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
    table = text_tower(model).token_embedding(model)
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
        if inputs[0].shape != tokens.shape:
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
