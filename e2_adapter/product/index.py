"""A searchable catalogue index: embeddings, product metadata and (optionally) a faiss index, in a folder.

    index = build_index(bundle, catalogue, "runs/index")             # embeds in batches, tags with E2's heads
    hits = CatalogueIndex.load("runs/index").search_text(bundle, "a navy silk coat", k=5, filters={"brand": "Ostra"})

Folder: ``index.json`` (what is in it and which model made it), ``embeddings.safetensors`` or
``embeddings.npy`` (L2-normalised image embeddings, one row per product's first view),
``metadata.jsonl`` (product id, text, catalogue tags, predicted tags with scores) and, with faiss
installed and asked for, ``faiss.index`` (exact inner product, IVF or HNSW). Everything loads as
JSON, safetensors or a numpy array without pickle.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.catalogue import ProductCatalogue
from ..training.distributed import rank_and_world
from ..wrap import get_adapter, get_backend, is_wrapped
from ..zoo import ClipBundle, source_of
from .bundle import parts
from ..torch_utils import eval_mode, model_device
from .classify import embed_images
from .images import CatalogueImages
from .tag import tag
from .vocab import vocabulary_from_catalogue
from ..files import atomic_write, atomic_write_json

INDEX_FILE = "index.json"
METADATA_FILE = "metadata.jsonl"
FAISS_FILE = "faiss.index"
FAISS_KINDS = ("exact", "ivf", "hnsw")
INDEX_FORMAT = "e2-adapter/index"


@dataclass
class Hit:
    rank: int
    product_id: str
    score: float
    text: str
    tags: dict
    predicted: dict

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("a faiss index needs faiss-cpu: pip install 'e2-adapter[faiss]' (or leave out --faiss; "
                          "exact numpy search needs nothing)") from None
    return faiss


def build_faiss(embeddings: np.ndarray, kind: str, nlist: int | None = None):
    """Inner-product faiss index over normalised rows (inner product = cosine)."""
    if kind not in FAISS_KINDS:
        raise ValueError(f"unknown faiss index {kind!r}; choose one of {FAISS_KINDS}")
    faiss = _faiss()
    dim = embeddings.shape[1]
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    else:  # IVF: ~sqrt(N) lists, trained on the embeddings themselves
        nlist = nlist or max(1, int(math.sqrt(len(embeddings))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, min(nlist, len(embeddings)), faiss.METRIC_INNER_PRODUCT)
        index.train(embeddings)
        index.nprobe = min(index.nlist, 8)
    index.add(embeddings)
    return index


def build_index(model, catalogue: ProductCatalogue, directory: str | os.PathLike, *, tokenizer=None,
                preprocess=None, vocabulary: dict[str, list[str]] | None = None, faiss: str | None = None,
                embeddings_format: str = "safetensors", batch_size: int = 64, progress: bool = True,
                encoder: dict | None = None, distributed: bool = False) -> "CatalogueIndex | None":
    """Embed the first view of every product into ``directory``. A wrapped E2 model also tags every
    product with its region heads (``vocabulary``, default the catalogue's own tag values of the
    model's entities), so searches can filter on predicted tags. ``encoder`` (e.g. the checkpoint
    folder) is recorded so ``e2-adapter search`` can load the same model. ``distributed``: every
    torchrun rank calls it and embeds a shard; rank 0 writes the index and returns it, others None."""
    if embeddings_format not in ("safetensors", "npy"):
        raise ValueError(f"embeddings_format must be 'safetensors' or 'npy', got {embeddings_format!r}")
    model, tokenizer, preprocess = parts(model, tokenizer, preprocess)
    if len(catalogue) == 0:
        raise ValueError(f"{catalogue!r} has no products to index")
    directory = Path(directory)
    main_rank = rank_and_world()[0] == 0 or not distributed
    if main_rank:
        directory.mkdir(parents=True, exist_ok=True)
    images = CatalogueImages(catalogue)
    embeddings = embed_images(model, images, preprocess, batch_size=batch_size, progress=progress and main_rank,
                              distributed=distributed)
    predicted = [{} for _ in range(len(catalogue))]
    if is_wrapped(model):
        heads = get_adapter(model).config.entities
        if vocabulary is None:
            entities = [e for e in heads if e in catalogue.entities]
            vocab = vocabulary_from_catalogue(catalogue, entities) if entities else {}
        else:
            vocab = {e: v for e, v in vocabulary.items() if e in heads}
        if vocab:
            rows = tag(model, images, vocab, tokenizer=tokenizer, preprocess=preprocess, batch_size=batch_size,
                       distributed=distributed)
            predicted = [{e: {"label": ps[0].label, "score": round(ps[0].score, 6)} for e, ps in row.items()}
                         for row in rows]
    if not main_rank:
        return None
    array = embeddings.numpy().astype(np.float32)
    name = f"embeddings.{embeddings_format}"
    if embeddings_format == "npy":
        def write_npy(tmp):
            with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a path
                np.save(f, array)
        atomic_write(directory / name, write_npy)
    else:
        from safetensors.numpy import save_file
        atomic_write(directory / name, lambda tmp: save_file({"image": array}, tmp))
    ids, texts, tags = catalogue.product_ids(), catalogue.texts(), catalogue.all_tags()

    def write_metadata(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            for p in range(len(catalogue)):
                f.write(json.dumps({"product_id": ids[p], "text": texts[p],
                                    "tags": {e: v[p] for e, v in tags.items()}, "predicted": predicted[p]},
                                   ensure_ascii=False) + "\n")
    atomic_write(directory / METADATA_FILE, write_metadata)
    if faiss:
        index = build_faiss(array, faiss)
        atomic_write(directory / FAISS_FILE, lambda tmp: _faiss().write_index(index, tmp))
    config = {"format": INDEX_FORMAT, "version": 1, "count": len(array), "dim": int(array.shape[1]),
              "embeddings": name, "faiss": faiss, "encoder": encoder, "source": source_of(model),
              "embedding": "L2-normalised global image embedding of each product's first view"}
    atomic_write_json(directory / INDEX_FILE, config)
    return CatalogueIndex.load(directory)


class CatalogueIndex:
    """A folder written by ``build_index``, loaded for search."""

    def __init__(self, directory: Path, config: dict, embeddings: np.ndarray, metadata: list[dict], faiss_index=None):
        self.directory, self.config, self.embeddings, self.metadata = directory, config, embeddings, metadata
        self.faiss_index = faiss_index

    @classmethod
    def load(cls, directory: str | os.PathLike, use_faiss: bool = True) -> "CatalogueIndex":
        directory = Path(directory)
        path = directory / INDEX_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a catalogue index: no {INDEX_FILE} (write one with "
                                    "`e2-adapter index` or build_index)")
        config = json.loads(path.read_text())
        if config.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path} is not an e2-adapter index (format {config.get('format')!r})")
        name = directory / config["embeddings"]
        if name.suffix == ".npy":
            embeddings = np.load(name, allow_pickle=False)
        else:
            from safetensors.numpy import load_file
            embeddings = load_file(str(name))["image"]
        with open(directory / METADATA_FILE, encoding="utf-8") as f:
            metadata = [json.loads(line) for line in f if line.strip()]
        if len(metadata) != len(embeddings):
            raise ValueError(f"{directory}: {len(embeddings)} embeddings but {len(metadata)} metadata rows")
        faiss_index = None
        if use_faiss and config.get("faiss") and (directory / FAISS_FILE).is_file():
            faiss_index = _faiss().read_index(str(directory / FAISS_FILE))
        return cls(directory, config, embeddings, metadata, faiss_index)

    def __len__(self) -> int:
        return len(self.metadata)

    def _matches(self, row: dict, filters: dict[str, str]) -> bool:
        """A filter is on the predicted tag where the index has one, else on the catalogue's own tag."""
        for entity, wanted in filters.items():
            value = row["predicted"][entity]["label"] if entity in row["predicted"] else row["tags"].get(entity)
            if value is None:
                raise ValueError(f"filter on {entity!r}: the index has no such tag (it has "
                                 f"{sorted(set(row['predicted']) | set(row['tags']))})")
            if value != wanted:
                return False
        return True

    def search(self, query: torch.Tensor | np.ndarray, k: int = 10, filters: dict[str, str] | None = None) -> list[Hit]:
        """The ``k`` products most similar (cosine) to one query embedding, after the tag filters."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.asarray(query.detach().cpu().float() if isinstance(query, torch.Tensor) else query, dtype=np.float32)
        q = q.reshape(-1)
        if q.shape[0] != self.embeddings.shape[1]:
            raise ValueError(f"query has {q.shape[0]} dimensions but the index holds {self.embeddings.shape[1]}-d "
                             "embeddings: search with the model that built the index")
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        if filters:
            candidates = np.array([i for i, row in enumerate(self.metadata) if self._matches(row, filters)], dtype=int)
            scores = self.embeddings[candidates] @ q if len(candidates) else np.zeros(0, np.float32)
            order = np.argsort(-scores, kind="stable")[:k]
            found = [(int(candidates[j]), float(scores[j])) for j in order]
        elif self.faiss_index is not None:
            scores, ids = self.faiss_index.search(q[None], min(k, len(self)))
            found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        else:
            scores = self.embeddings @ q
            found = [(int(i), float(scores[i])) for i in np.argsort(-scores, kind="stable")[:k]]
        return [Hit(r + 1, self.metadata[i]["product_id"], s, self.metadata[i]["text"], self.metadata[i]["tags"],
                    self.metadata[i]["predicted"]) for r, (i, s) in enumerate(found)]

    def search_text(self, model, text: str, k: int = 10, filters=None, *, tokenizer=None) -> list[Hit]:
        model, tokenizer, _ = parts(model, tokenizer)
        backend = get_backend(model)
        with eval_mode(model):
            query = backend.encode_text(tokenizer([text]).to(model_device(model)))[0].float()
        return self.search(F.normalize(query, dim=-1), k, filters)

    def search_image(self, model, image, k: int = 10, filters=None, *, preprocess=None) -> list[Hit]:
        """``image``: a path, a PIL image or a preprocessed [3, H, W] tensor."""
        if isinstance(model, ClipBundle):
            model, preprocess = model.model, preprocess or model.preprocess
        images = image[None] if isinstance(image, torch.Tensor) else [image]
        return self.search(embed_images(model, images, preprocess)[0], k, filters)
