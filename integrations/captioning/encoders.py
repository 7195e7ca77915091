"""The encoder side of a captioner: any CLIP-like model, used frozen.

Captioners never own their encoder. They take it as an argument at training and at inference,
so swapping CLIP-FT for E2 (or back) is a one-line change and can never touch decoder weights.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from e2_adapter.backends import UnsupportedModelError
from e2_adapter.evaluation.embed import embed_texts as library_embed_texts
from e2_adapter.torch_utils import eval_mode, model_device  # noqa: F401  (re-exported)
from e2_adapter.wrap import clip_towers


class ClipLike(Protocol):
    """What the captioners need: the two towers of a CLIP, projecting into one space. A model of a
    family e2-adapter knows is encoded through its backend (``e2_adapter.wrap.clip_towers``), so a
    transformers CLIPModel, which has neither method, is CLIP-like too."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...


TextTokenizerFn = Callable[[list[str]], torch.Tensor]


def resolve_encoder(model: ClipLike | None = None, adapter_dir: str | None = None,
                    base: ClipLike | None = None) -> ClipLike:
    """Return the encoder to caption with: ``model`` itself, or ``base`` with an E2 adapter loaded.

    ``model`` may be a wrapped E2 model or a plain CLIP. ``adapter_dir`` needs ``base``, the CLIP
    the adapter was trained on; ``e2_adapter.load_adapter`` is imported only then.
    """
    if adapter_dir is not None:
        if model is not None:
            raise ValueError("give either model or adapter_dir (with base), not both")
        if base is None:
            raise ValueError("adapter_dir needs base: the CLIP model the adapter was trained on")
        try:
            from e2_adapter import load_adapter
        except ImportError as exc:  # the core package may be older than this integration
            raise RuntimeError("e2_adapter.load_adapter is not available in this install") from exc
        model = load_adapter(base, adapter_dir)
    if model is None:
        raise ValueError("no encoder: pass model, or adapter_dir together with base")
    try:
        clip_towers(model)
    except UnsupportedModelError as err:
        missing = [name for name in ("encode_image", "encode_text") if not callable(getattr(model, name, None))]
        raise TypeError(f"{type(model).__name__} is not CLIP-like: it lacks {', '.join(missing)} and {err}") from err
    return model


# One home for these (e2_adapter.torch_utils); ``frozen`` is the captioners' name for eval_mode.
frozen = eval_mode


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def embed_texts(model: ClipLike, tokenizer: TextTokenizerFn, texts: Sequence[str],
                batch_size: int = 256) -> torch.Tensor:
    """L2-normalised ``encode_text`` embeddings, float32 on the CPU, shape [N, D] (the library's
    ``e2_adapter.evaluation.embed.embed_texts`` with ``normalize=True``)."""
    if len(texts) == 0:
        raise ValueError("no texts to embed")
    return library_embed_texts(model, tokenizer, list(texts), batch_size=batch_size, normalize=True)


def embed_images(model: ClipLike, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised ``encode_image`` embeddings of preprocessed images, float32 on the CPU."""
    device, towers = model_device(model), clip_towers(model)
    dtype = next((p.dtype for p in model.parameters()), torch.float32) if isinstance(model, nn.Module) else torch.float32
    out = []
    with frozen(model):
        for part in _batches(len(images), batch_size):
            batch = images[part].to(device=device, dtype=dtype if dtype.is_floating_point else torch.float32)
            out.append(F.normalize(towers.encode_image(batch).float(), dim=-1).cpu())
    return torch.cat(out)


def embed_corpus_images(model: ClipLike, preprocess, corpus, batch_size: int = 64, view: int = 0) -> torch.Tensor:
    """``embed_images`` of one view (default the first) of every product of a ``CaptionCorpus``,
    preprocessing ``batch_size`` images at a time so a large corpus is never in memory at once."""
    parts = []
    for start in range(0, len(corpus), batch_size):
        products = range(start, min(start + batch_size, len(corpus)))
        parts.append(embed_images(model, torch.stack([preprocess(im) for im in corpus.images(products, view=view)])))
    return torch.cat(parts)


def check_width(expected: int, got: int, encoder_name: str | None = None) -> None:
    """Fail loudly when a decoder trained on one embedding space meets another width."""
    if expected != got:
        trained_on = f" from encoder {encoder_name!r}" if encoder_name else ""
        raise ValueError(
            f"embedding width mismatch: the decoder was trained on {expected}-d embeddings{trained_on}, "
            f"but this encoder gives {got}-d. A captioner must be trained with the text tower of the encoder "
            "it captions with: retrain the decoder on this encoder.")
