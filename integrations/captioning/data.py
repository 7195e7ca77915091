"""Caption corpora from FashionGen-layout h5 files (FashionGen itself or FashionSynth).

One caption per product, written in a configurable style. The default, ``full``, is the paper's
"full text": the description followed by the four tag fields, e.g.
"Long sleeve linen shirt in olive. Spread collar. Brand: Wren Oakes. Sub-category: SHIRTS.
Composition: 100% linen. Season: SS2018." The same corpus gives the training captions (text-only
training), the reference captions (evaluation) and the tags (entity accuracy).
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

ENTITIES = ("brand", "subcategory", "composition", "season")
FIELDS = ("description", "name") + ENTITIES

STYLES: dict[str, str] = {
    # The paper's captioning text: description, then the tag fields.
    "full": "{description} Brand: {brand}. Sub-category: {subcategory}. Composition: {composition}. "
            "Season: {season}.",
    # The same fields first: survives truncation to a short text context or decoder length.
    "tags_first": "Brand: {brand}. Sub-category: {subcategory}. Composition: {composition}. "
                  "Season: {season}. {description}",
    # E2's training text (the reference code's order).
    "e2": "{composition}. {subcategory}. {brand}. {season}. {description}",
    "tags": "Brand: {brand}. Sub-category: {subcategory}. Composition: {composition}. Season: {season}.",
    "description": "{description}",
    "name": "{name}.",
}


def style_template(style: str) -> str:
    """A style name from ``STYLES``, or a ``str.format`` template over ``FIELDS`` itself."""
    template = STYLES.get(style, style)
    used = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    if not used:
        raise ValueError(f"unknown caption style {style!r}: choose one of {sorted(STYLES)} "
                         f"or give a template using {{field}}s from {FIELDS}")
    unknown = sorted(used - set(FIELDS))
    if unknown:
        raise ValueError(f"caption template uses unknown field(s) {unknown}; available: {FIELDS}")
    return template


def format_caption(template: str, fields: dict[str, str]) -> str:
    """Fill a template: descriptions end in a full stop, tag values lose theirs, spaces collapse."""
    clean = {k: v.strip() for k, v in fields.items()}
    for entity in ENTITIES:
        if entity in clean:
            clean[entity] = clean[entity].rstrip(". ")
    if clean.get("description") and clean["description"][-1] not in ".!?":
        clean["description"] += "."
    text = template.format(**clean)
    text = re.sub(r"\s+", " ", text)
    return re.sub(r"\.(\s*\.)+", ".", text).strip()


def single_sentence(captions: Sequence[str]) -> bool:
    """True when no caption has a full stop before its end (then '.' can end decoding)."""
    return all("." not in c.rstrip().rstrip(".") for c in captions)


@dataclass
class CaptionCorpus:
    """The products of one h5 file with a caption each; product ``i`` is row ``i`` everywhere."""

    path: Path
    style: str
    product_ids: list[str] = field(repr=False)
    fields: list[dict[str, str]] = field(repr=False)
    captions: list[str] = field(repr=False)

    def __repr__(self) -> str:
        return f"CaptionCorpus('{self.path}', style={self.style!r}, products={len(self)})"

    def __len__(self) -> int:
        return len(self.product_ids)

    def references(self) -> dict[str, list[str]]:
        """Product id -> reference captions (FashionGen has one text per product)."""
        return {pid: [caption] for pid, caption in zip(self.product_ids, self.captions)}

    def tags(self) -> dict[str, dict[str, str]]:
        """Product id -> {entity: tag value}, for entity accuracy."""
        return {pid: {e: f[e] for e in ENTITIES if e in f} for pid, f in zip(self.product_ids, self.fields)}

    def images(self, products: Sequence[int] | None = None, view: int = 0) -> list[Image.Image]:
        """One view (default the first) of each product; images are read from the h5 file lazily."""
        catalogue = _catalogue(self.path, "{description}")
        indices = range(len(self)) if products is None else products
        return [catalogue.load_image(p, min(view, catalogue.num_views(p) - 1)) for p in indices]


def _catalogue(path: str | Path, template: str, max_products: int | None = None):
    from e2_adapter.data.fashiongen import FashionGenH5  # the project's h5 reader
    return FashionGenH5(path, text_template=template, max_products=max_products)


def load_corpus(path: str | Path, style: str = "full", max_products: int | None = None) -> CaptionCorpus:
    """Read every product of a FashionGen-layout h5 file and caption it in ``style``."""
    template = style_template(style)
    catalogue = _catalogue(path, "{description}", max_products)
    columns = {"description": catalogue.texts(), **catalogue.all_tags()}
    if "{name}" in template:
        columns["name"] = _catalogue(path, "{name}", max_products).texts()
    fields = [{k: col[p] for k, col in columns.items()} for p in range(len(catalogue))]
    captions = [format_caption(template, f) for f in fields]
    return CaptionCorpus(Path(path), style, catalogue.product_ids(), fields, captions)
