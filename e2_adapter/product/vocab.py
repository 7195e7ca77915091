"""Label vocabularies per entity and their text embeddings, shared by classify and tag.

A vocabulary is ``{entity: [label, ...]}``: from a catalogue's tags (the training data), a JSON file,
or ``ENTITY=a,b,c`` flags. Labels are embedded through prompt templates, averaged over the templates
(CLIP's prompt ensembling) and L2-normalised, so a score is a cosine similarity.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.catalogue import ProductCatalogue
from ..torch_utils import model_device
from ..wrap import get_backend

# Zero-shot prompts for the global embedding, one list per entity (FashionSynth/FashionGen tag values).
CLASSIFY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "brand": ("a product by {}.", "{}", "clothing from the brand {}."),
    "season": ("{} collection.", "{}", "a garment from the {} season."),
    "subcategory": ("a photo of {}.", "{}", "a photo of a garment: {}."),
    "composition": ("a garment made of {}.", "{}", "{} fabric."),
}
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of {}.", "{}")
# E2's region loss aligns each region embedding with the raw tag text (losses.e2_loss sees the value
# itself), so tagging from the region heads scores the bare value, as in training.
TAG_TEMPLATES: tuple[str, ...] = ("{}",)


def vocabulary_from_catalogue(catalogue: ProductCatalogue, entities=None) -> dict[str, list[str]]:
    """Every distinct tag value of each entity in ``catalogue``, sorted."""
    entities = tuple(entities or catalogue.entities)
    unknown = [e for e in entities if e not in catalogue.entities]
    if unknown:
        raise ValueError(f"entities {unknown} are not tags of {catalogue!r}; it has {catalogue.entities}")
    tags = catalogue.all_tags()
    return {e: sorted({v for v in tags[e] if v}) for e in entities}


def parse_label_flags(items: list[str]) -> dict[str, list[str]]:
    """``["brand=Ostra,Vetrano", "season=FW2017"]`` -> ``{"brand": [...], "season": [...]}``."""
    vocab: dict[str, list[str]] = {}
    for item in items:
        entity, sep, labels = item.partition("=")
        values = [v.strip() for v in labels.split(",") if v.strip()]
        if not sep or not entity or not values:
            raise ValueError(f"--labels {item!r}: expected ENTITY=label1,label2 (e.g. brand=Ostra,Vetrano)")
        vocab.setdefault(entity.strip(), []).extend(values)
    return vocab


def read_vocabulary(path: str | Path) -> dict[str, list[str]]:
    """A JSON file ``{entity: [label, ...]}``."""
    try:
        vocab = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"vocabulary {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, list) and v and all(isinstance(x, str) for x in v)
                                              for v in vocab.values()):
        raise ValueError(f"vocabulary {path}: expected a JSON object {{entity: [label, ...]}} with non-empty lists")
    return vocab


def check_vocabulary(vocab: dict[str, list[str]]) -> dict[str, list[str]]:
    if not vocab:
        raise ValueError("empty vocabulary: give labels per entity, e.g. {'brand': ['Ostra', 'Vetrano']}")
    for entity, labels in vocab.items():
        if not labels:
            raise ValueError(f"entity {entity!r} has no labels")
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ValueError(f"entity {entity!r} lists {repeated} more than once")
    return {e: list(v) for e, v in vocab.items()}


def templates_for(entity: str, templates) -> tuple[str, ...]:
    """``templates``: None (the defaults), one list for every entity, or ``{entity: [...]}``."""
    if templates is None:
        chosen = CLASSIFY_TEMPLATES.get(entity, DEFAULT_TEMPLATES)
    elif isinstance(templates, dict):
        chosen = templates.get(entity, CLASSIFY_TEMPLATES.get(entity, DEFAULT_TEMPLATES))
    else:
        chosen = tuple(templates)
    bad = [t for t in chosen if "{}" not in t]
    if bad or not chosen:
        raise ValueError(f"templates for {entity!r} must each contain '{{}}' (where the label goes), got {list(chosen)}")
    return tuple(chosen)


@torch.no_grad()
def label_embeddings(model, tokenizer, labels: list[str], templates: tuple[str, ...],
                     batch_size: int = 256) -> torch.Tensor:
    """[len(labels), D]: each label's normalised text embeddings averaged over the templates, normalised."""
    backend = get_backend(model)
    device = model_device(model)
    texts = [t.format(label) for label in labels for t in templates]
    rows = [backend.encode_text(tokenizer(texts[i:i + batch_size]).to(device)).float()
            for i in range(0, len(texts), batch_size)]
    emb = F.normalize(torch.cat(rows), dim=-1).view(len(labels), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1).cpu()
