"""Attribute tagging from E2's region heads: each entity's region embedding against that entity's labels.

    rows = e2_adapter.product.tag(bundle, images, vocabulary)         # {entity: [Prediction]} per image
    write_tags(rows, ids, "tags.csv")                                   # or .jsonl

This is what a plain CLIP cannot do: the brand head looks at the patches its tokens picked, so a
brand is read from the brand region, not from one global vector shared with colour and shape.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..data.catalogue import ProductCatalogue
from ..files import atomic_write
from ..wrap import get_adapter, is_wrapped
from .bundle import parts
from .classify import Prediction, _labels, _per_image, accuracy, classify, embed_images, logit_scale, rank
from .images import CatalogueImages
from .vocab import TAG_TEMPLATES, check_vocabulary, templates_for, vocabulary_from_catalogue


def tag(model, images, vocabulary: dict[str, list[str]], *, tokenizer=None, preprocess=None,
        templates=TAG_TEMPLATES, top_k: int = 1, batch_size: int = 64,
        distributed: bool = False) -> list[dict[str, list[Prediction]]]:
    """Top-k labels per entity for each image, each entity scored from its own region embedding.
    ``templates`` default to the bare label, the text the region loss trained against.
    ``distributed``: the images are embedded in shards across torchrun ranks (all get every row)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    model, tokenizer, preprocess = parts(model, tokenizer, preprocess)
    vocabulary = check_vocabulary(vocabulary)
    if not is_wrapped(model):
        raise ValueError("tagging reads E2's region heads: load an E2 model (a save_pretrained folder with an "
                         "adapter, or e2_adapter.wrap + training); for a plain CLIP use classify()")
    entities = get_adapter(model).config.entities
    unknown = [e for e in vocabulary if e not in entities]
    if unknown:
        raise ValueError(f"entities {unknown} have no region head in this model (it has {entities}); "
                         "tag only those, or use classify() for zero-shot labels from the global embedding")
    _, regions = embed_images(model, images, preprocess, regions=True, batch_size=batch_size,
                              distributed=distributed)
    scale = logit_scale(model)
    by_entity = {e: rank(regions[e], _labels(model, tokenizer, labels, templates_for(e, templates)), labels,
                         top_k, scale) for e, labels in vocabulary.items()}
    return _per_image(by_entity, len(next(iter(regions.values()))))


def write_tags(rows: list[dict[str, list[Prediction]]], ids: list[str], path: str | os.PathLike) -> Path:
    """CSV (``id, <entity>, <entity>_score`` for the top label) or JSONL (every label with its scores),
    chosen by the suffix; written atomically."""
    path = Path(path)
    if path.suffix not in (".csv", ".jsonl"):
        raise ValueError(f"{path}: write tags to a .csv or .jsonl file")
    if len(rows) != len(ids):
        raise ValueError(f"{len(rows)} rows of tags but {len(ids)} ids")

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                for i, row in zip(ids, rows):
                    f.write(json.dumps({"id": i, "tags": {e: [p.to_dict() for p in ps] for e, ps in row.items()}},
                                       ensure_ascii=False) + "\n")
            else:
                entities = list(rows[0]) if rows else []
                writer = csv.writer(f)
                writer.writerow(["id"] + [c for e in entities for c in (e, f"{e}_score")])
                for i, row in zip(ids, rows):
                    writer.writerow([i] + [c for e in entities for c in (row[e][0].label, f"{row[e][0].score:.4f}")])
    atomic_write(path, write)
    return path


def tagging_accuracy(model, catalogue: ProductCatalogue, vocabulary: dict[str, list[str]] | None = None, *,
                     tokenizer=None, preprocess=None, entities=None, batch_size: int = 64) -> dict[str, dict]:
    """Top-1 accuracy (%) per entity on a labelled catalogue (first view of each product): region
    tagging vs zero-shot classification from the global embedding, with the chance level.
    ``vocabulary`` defaults to the catalogue's own tag values."""
    model, tokenizer, preprocess = parts(model, tokenizer, preprocess)
    entities = tuple(entities or [e for e in get_adapter(model).config.entities if e in catalogue.entities])
    vocabulary = vocabulary or vocabulary_from_catalogue(catalogue, entities)
    vocabulary = {e: vocabulary[e] for e in entities}
    truth = {e: catalogue.all_tags()[e] for e in entities}
    images = CatalogueImages(catalogue)
    common = dict(tokenizer=tokenizer, preprocess=preprocess, batch_size=batch_size)
    return {"region tagging": accuracy(tag(model, images, vocabulary, **common), truth),
            "global zero-shot": accuracy(classify(model, images, vocabulary, **common), truth),
            "chance": {e: 100.0 / len(v) for e, v in vocabulary.items()},
            "products": len(catalogue)}
