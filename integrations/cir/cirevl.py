"""Training-free composed retrieval, CIReVL style: caption -> rewrite -> text-to-image retrieval.

1. Describe the reference image: a captioner ``(list[PIL.Image]) -> list[str]`` (the project's
   captioning shims, BLIP-2, ...) or supplied captions (e.g. a product's own description, the
   "oracle caption" mode). Captions are cached in a JSON file ``{image name: caption}``.
2. Rewrite the description with the modification text (``rewriter.py``: rules or an LLM).
3. Encode the rewritten description with the model's text tower and rank the gallery, which is
   encoded once with the model's image tower and cached as safetensors, keyed by the model's
   weights and the gallery's files.

The gallery encoder (``ImageFeatures``) is shared with the Pic2Word pipeline.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from e2_adapter.evaluation.embed import embed_texts
from e2_adapter.files import atomic_write_json
from e2_adapter.torch_utils import model_device
from e2_adapter.wrap import clip_towers

from .fashioniq import FashionIQ, Triplet
from .rewriter import Rewriter, as_rewriter

Captioner = Callable[[list[Image.Image]], list[str]]
ImageLoader = Callable[[str], Image.Image]


def model_fingerprint(model: nn.Module, preprocess: Optional[Callable] = None) -> str:
    """A cheap identity of a model's weights (names, shapes, sums and a strided sample of every
    tensor) and of its image transform, so a cache never serves another model's embeddings."""
    h = hashlib.sha1(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            if t.numel() and (t.is_floating_point() or t.dtype in (torch.int64, torch.int32)):
                flat = t.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 64)][:64]
                h.update(np.float64(flat.double().sum().item()).tobytes())
                h.update(sample.double().cpu().numpy().tobytes())
    if preprocess is not None:
        h.update(repr(preprocess).encode())
    return h.hexdigest()


def encode_image(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The family's image embedding ``[B, D]``, from its backend (``clip_towers``; HF CLIPModel has no
    ``encode_image``)."""
    return clip_towers(model).encode_image(images)


def file_identity(path: Path) -> str:
    st = os.stat(path)
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


class ImageFeatures:
    """Image-tower embeddings of named images, computed once.

    ``image_features(names) -> [N, D]`` (raw, unnormalized, float32 on CPU). With ``cache_dir``, a set
    encoded by ``precompute`` is saved as ``gallery-<model>-<images>.safetensors`` and reloaded when
    the same model (weights + transform) meets the same images (names + file sizes + mtimes).
    """

    def __init__(self, model: nn.Module, preprocess: Callable[[Image.Image], torch.Tensor], load_image: ImageLoader,
                 cache_dir: Optional[str | Path] = None, identify: Optional[Callable[[str], str]] = None,
                 batch_size: int = 64, model_id: Optional[str] = None):
        self.model, self.preprocess, self.load_image = model, preprocess, load_image
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.identify = identify or (lambda name: name)
        self.batch_size = batch_size
        self._model_id = model_id
        self._rows: dict[str, torch.Tensor] = {}

    @classmethod
    def for_dataset(cls, model: nn.Module, preprocess: Callable, dataset: FashionIQ, **kwargs) -> "ImageFeatures":
        return cls(model, preprocess, dataset.load_image,
                   identify=lambda n: file_identity(dataset.image_path(n)), **kwargs)

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            self._model_id = model_fingerprint(self.model, self.preprocess)
        return self._model_id

    def cache_path(self, names: Sequence[str]) -> Optional[Path]:
        if self.cache_dir is None:
            return None
        h = hashlib.sha1("\n".join(self.identify(n) for n in names).encode()).hexdigest()
        return self.cache_dir / f"gallery-{self.model_id[:16]}-{h[:16]}.safetensors"

    def precompute(self, names: Iterable[str]) -> None:
        """Encode ``names`` (or load them from the cache) and keep them in memory."""
        names = list(dict.fromkeys(names))
        path = self.cache_path(names)
        if path is not None and path.is_file():
            stored = load_file(str(path))["embeddings"]
            meta = json.loads(_metadata(path).get("names", "[]"))
            if meta == names:
                self._rows.update(zip(names, stored))
                return
        todo = [n for n in names if n not in self._rows]
        self._rows.update(zip(todo, self._encode(todo)))
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"embeddings": torch.stack([self._rows[n] for n in names]).contiguous()}, str(path),
                      metadata={"names": json.dumps(names), "model": self.model_id})

    @torch.no_grad()
    def _encode(self, names: Sequence[str]) -> list[torch.Tensor]:
        if not names:
            return []
        device, was_training = model_device(self.model), self.model.training
        self.model.eval()
        out = []
        try:
            for i in range(0, len(names), self.batch_size):
                batch = torch.stack([self.preprocess(self.load_image(n)) for n in names[i:i + self.batch_size]])
                out.append(encode_image(self.model, batch.to(device)).float().cpu())
        finally:
            self.model.train(was_training)
        return list(torch.cat(out))

    def __call__(self, names: Sequence[str]) -> torch.Tensor:
        missing = [n for n in dict.fromkeys(names) if n not in self._rows]
        self._rows.update(zip(missing, self._encode(missing)))
        return torch.stack([self._rows[n] for n in names])


def _metadata(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


# -- captions ---------------------------------------------------------------------------------------
class CaptionStore:
    """Captions of named images, ``{name: caption}``, optionally persisted as JSON.

    Missing captions come from ``captioner`` (batched); with neither a stored caption nor a
    captioner, asking for an image is an error that names it.
    """

    def __init__(self, captions: Optional[Mapping[str, str]] = None, captioner: Optional[Captioner] = None,
                 path: Optional[str | Path] = None, batch_size: int = 32):
        self.path = Path(path) if path is not None else None
        self.captions: dict[str, str] = {}
        if self.path is not None and self.path.is_file():
            self.captions.update(load_captions(self.path))
        self.captions.update(captions or {})
        self.captioner, self.batch_size = captioner, batch_size

    def __call__(self, names: Sequence[str], load_image: ImageLoader) -> list[str]:
        missing = [n for n in dict.fromkeys(names) if n not in self.captions]
        if missing and self.captioner is None:
            raise KeyError(f"no caption for {len(missing)} reference image(s), e.g. {missing[:3]}; "
                           "supply captions (e.g. --captions file.json) or a captioner")
        for i in range(0, len(missing), self.batch_size):
            batch = missing[i:i + self.batch_size]
            texts = self.captioner([load_image(n) for n in batch])
            if len(texts) != len(batch):
                raise ValueError(f"the captioner returned {len(texts)} captions for {len(batch)} images")
            self.captions.update(zip(batch, (str(t) for t in texts)))
            self.save()
        return [self.captions[n] for n in names]

    def save(self) -> None:
        if self.path is not None:
            # Atomic: a kill mid-save must not cost the captions already paid for.
            atomic_write_json(self.path, self.captions, indent=1, ensure_ascii=False)


def load_captions(path: str | Path) -> dict[str, str]:
    """A captions JSON file: ``{image name: caption}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"{path} must hold a JSON object {{image name: caption}}")
    return data


# -- text side --------------------------------------------------------------------------------------
def encode_texts(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], texts: Sequence[str],
                 batch_size: int = 256) -> torch.Tensor:
    """Text-tower embeddings ``[N, D]`` (raw, float32 on CPU): the library's
    ``e2_adapter.evaluation.embed.embed_texts``."""
    return embed_texts(model, tokenizer, list(texts), batch_size=batch_size)


class CIReVL:
    """The training-free composer: ``compose(triplets, dataset) -> [Q, D]`` text embeddings.

    Args:
        model, tokenizer: the (E2-wrapped) CLIP and its tokenizer.
        rewriter: ``(caption, modification) -> target description``; default ``RuleRewriter()``.
        captions: a ``CaptionStore`` (or a plain ``{name: caption}`` dict) describing references.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                 captions: CaptionStore | Mapping[str, str], rewriter: Optional[Rewriter] = None,
                 batch_size: int = 256):
        self.model, self.tokenizer = model, tokenizer
        self.captions = captions if isinstance(captions, CaptionStore) else CaptionStore(captions)
        self.rewriter = as_rewriter(rewriter)
        self.batch_size = batch_size
        self.log: list[dict] = []  # every query's caption and description, for inspection and reports

    def target_descriptions(self, triplets: Sequence[Triplet], dataset: FashionIQ) -> list[str]:
        references = self.captions([t.reference for t in triplets], dataset.load_image)
        descriptions = [self.rewriter(c, t.modification) for c, t in zip(references, triplets)]
        self.log.extend(
            {"category": t.category, "reference": t.reference, "target": t.target, "caption": c,
             "modification": t.modification, "description": d} for t, c, d in zip(triplets, references, descriptions))
        return descriptions

    def compose(self, triplets: Sequence[Triplet], dataset: FashionIQ) -> torch.Tensor:
        return encode_texts(self.model, self.tokenizer, self.target_descriptions(triplets, dataset), self.batch_size)


def evaluate_cirevl(model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], preprocess: Callable,
                    dataset: FashionIQ, captions: CaptionStore | Mapping[str, str], rewriter: Optional[Rewriter] = None,
                    cache_dir: Optional[str | Path] = None, categories: Optional[Iterable[str]] = None,
                    exclude_reference: bool = False, batch_size: int = 64) -> tuple[dict, CIReVL]:
    """CIReVL on a FashionIQ-layout dataset: R@10 / R@50 per category and averaged.

    Returns the report and the composer (its ``log`` holds every query's caption and description).
    """
    from .fashioniq import evaluate
    images = ImageFeatures.for_dataset(model, preprocess, dataset, cache_dir=cache_dir, batch_size=batch_size)
    images.precompute(n for c in (categories or dataset.categories) for n in dataset.gallery(c))
    composer = CIReVL(model, tokenizer, captions, rewriter)
    return evaluate(dataset, composer, images, categories, exclude_reference=exclude_reference), composer
