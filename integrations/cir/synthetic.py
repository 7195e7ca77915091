"""A synthetic composed-retrieval set from a product catalogue (FashionSynth, or FashionGen itself).

Each query is a reference product, an edit of exactly one attribute written as FashionIQ-style
relative captions ("is red", "is red instead of black"), and a target product of the same catalogue
that differs from the reference in that attribute and agrees on the other three:

    colour       parsed from the product name / description (the catalogue has no colour tag)
    brand        the brand tag
    fabric       the composition tag ("96% cotton, 4% polyurethane")
    subcategory  the sub-category tag ("SHIRTS")

Written in FashionIQ's layout, with one *category per edited attribute*, so the FashionIQ loader,
metrics and commands run on it unchanged and per-category results are per-attribute results::

    out/captions/cap.{colour,brand,fabric,subcategory}.{split}.json
    out/image_splits/split.{attribute}.{split}.json   # every product of the catalogue (same gallery)
    out/images/{product id}.png                       # the product's first view (the id made file-safe)
    out/edits.{split}.json              # per triplet: attribute, reference, target, from, to
    out/reference_captions.{split}.json # {image: oracle caption}, for CIReVL's oracle-caption mode
    out/products.{split}.json           # {image: the product's attributes and text}
    out/vocab.json                      # colours, materials, garments, brands (for RuleRewriter)
"""
from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .rewriter import ATTRIBUTES, DEFAULT_COLOURS, DEFAULT_GARMENTS, RuleRewriter, main_material, singular

# catalogue tag behind each edited attribute (colour has none: it is read from the text)
TAG_OF = {"brand": "brand", "fabric": "composition", "subcategory": "subcategory"}
_PLURAL_ONLY = {"pants", "jeans", "trousers", "shorts", "leggings", "sneakers", "boots", "sandals"}


@dataclass(frozen=True)
class Product:
    image: str          # image name in the FashionIQ layout (the product id)
    index: int          # product index in the catalogue
    colour: str         # "" when the text names no known colour
    brand: str
    fabric: str         # the composition string
    subcategory: str
    title: str          # first sentence of the product text (FashionGen: the name)
    text: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)

    def caption(self) -> str:
        """The oracle caption: what a perfect captioner would say about every edited attribute."""
        return f"{self.title} by {self.brand}, {self.fabric}"


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_image_name(product_id: str) -> str:
    """A product id as a file name that stays inside the images folder: path separators and every other
    character outside letters, digits, '.', '_' and '-' become '_', and a leading '.' is escaped
    ('../../x' -> '_.._.._x'), so no id can climb out of the output folder or hide a file."""
    name = _UNSAFE.sub("_", str(product_id))
    if not name:
        raise ValueError("an empty product id cannot name an image; give every product an id")
    return "_" + name if name.startswith(".") else name


def find_colour(text: str, colours: Sequence[str] = DEFAULT_COLOURS) -> str:
    """First colour word of ``text`` (longest names first so "off-white" beats "white")."""
    alternation = "|".join(re.escape(c) for c in sorted(colours, key=len, reverse=True))
    m = re.search(rf"\b({alternation})\b", text, re.I)
    return m.group(1).lower() if m else ""


def _garment(subcategory: str) -> str:
    return singular(subcategory)


_GARMENT_WORD = re.compile(
    r"\b(" + "|".join(re.escape(g) for g in sorted(DEFAULT_GARMENTS, key=len, reverse=True)) + r")\b", re.I)


def wording(product: Product, attribute: str) -> str:
    """How a relative caption names the product's value: the garment noun of its title for the
    sub-category ("trousers" rather than "PANTS"), the value itself otherwise."""
    if attribute != "subcategory":
        return product.value(attribute)
    m = _GARMENT_WORD.search(product.title)
    return m.group(1).lower() if m else _garment(product.subcategory)


def _a(word: str) -> str:
    """Article for a garment noun ("a shirt", "an overcoat", "pants")."""
    if word in _PLURAL_ONLY:
        return word
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def edit_captions(attribute: str, old: str, new: str, rng: random.Random) -> list[str]:
    """Two FashionIQ-style relative captions for changing ``attribute`` from ``old`` to ``new``
    (for the sub-category: garment nouns such as "skirt", "trousers")."""
    if attribute == "colour":
        options = [[f"is {new}", f"is {new} instead of {old}"],
                   [f"has a {new} color", f"is {new} not {old}"],
                   [f"is {new} in color", f"is {new} rather than {old}"]]
    elif attribute == "brand":
        options = [[f"has a logo of {new}", f"is by {new} instead of {old}"],
                   [f"is by {new}", f"has a logo of {new} instead of {old}"],
                   [f"is from {new}", f"has a logo of {new}"]]
    elif attribute == "fabric":
        main_new, main_old = main_material(new), main_material(old)
        second = (f"is {main_new} rather than {main_old}" if main_new != main_old
                  else f"is made of {new} instead of {old}")
        options = [[f"is made of {new}", second], [f"has a {new} fabric", second]]
    elif attribute == "subcategory":
        g_new, g_old = new.lower(), old.lower()
        options = [[f"is {_a(g_new)}", f"is {_a(g_new)} instead of {_a(g_old)}"],
                   [f"is {_a(g_new)} not {_a(g_old)}", f"is shaped like {_a(g_new)}"]]
    else:
        raise ValueError(f"unknown attribute {attribute!r}; choose from {ATTRIBUTES}")
    return rng.choice(options)


def read_products(catalogue, colours: Sequence[str] = DEFAULT_COLOURS) -> list[Product]:
    """One ``Product`` per catalogue product (a ``ProductCatalogue`` with brand, subcategory and
    composition tags; its text should name the colour, as FashionGen's and FashionSynth's do)."""
    missing = [t for t in ("brand", "subcategory", "composition") if t not in catalogue.entities]
    if missing:
        raise ValueError(f"the catalogue lacks tag(s) {missing}; the synthetic set edits brand, "
                         "composition and sub-category")
    tags = (catalogue.all_tags() if hasattr(catalogue, "all_tags")
            else {e: [catalogue.tags(p)[e] for p in range(len(catalogue))] for e in catalogue.entities})
    texts, ids = catalogue.texts(), catalogue.product_ids()
    products = []
    for p, (text, pid) in enumerate(zip(texts, ids)):
        title = re.split(r"(?<=[^\d])\.\s", text.strip(), maxsplit=1)[0].strip().rstrip(".")
        products.append(Product(image=safe_image_name(pid), index=p, colour=find_colour(text, colours),
                                brand=tags["brand"][p], fabric=tags["composition"][p].rstrip(". "),
                                subcategory=tags["subcategory"][p], title=title, text=text))
    return products


def find_pairs(products: Sequence[Product], attribute: str) -> list[tuple[Product, Product]]:
    """Ordered (reference, target) pairs that differ in ``attribute`` and agree on the others."""
    others = [a for a in ATTRIBUTES if a != attribute]
    groups: dict[tuple, list[Product]] = defaultdict(list)
    for p in products:
        if p.colour:  # products whose colour we cannot read cannot prove they share it
            groups[tuple(p.value(a) for a in others)].append(p)
    pairs = []
    for members in groups.values():
        for ref in members:
            pairs += [(ref, tgt) for tgt in members if tgt.value(attribute) != ref.value(attribute)]
    return pairs


def vocabulary(products: Sequence[Product]) -> dict[str, list[str]]:
    """What the rule rewriter should know about this catalogue."""
    materials = set()
    for p in products:
        materials.update(m.strip() for m in re.findall(r"%\s*([a-z][a-z \-]*)", p.fabric.lower()))
    return {"colours": sorted({p.colour for p in products if p.colour}),
            "materials": sorted(materials),
            "garments": sorted({_garment(p.subcategory) for p in products}),
            "brands": sorted({p.brand for p in products})}


def open_catalogue(path: str | Path):
    """A FashionGen-layout h5 whose product text starts with the name (where colour is)."""
    from e2_adapter.data import FashionGenH5
    return FashionGenH5(path, text_template="{name}. {description}")


def build_synthetic_cir(catalogue, out_dir: str | Path, split: str = "val", per_attribute: int = 200,
                        attributes: Iterable[str] = ATTRIBUTES, seed: int = 0,
                        colours: Sequence[str] = DEFAULT_COLOURS, max_gallery: Optional[int] = None) -> dict:
    """Write the set (see the module docstring); returns a summary with triplets per attribute.

    ``catalogue`` is a ``ProductCatalogue`` or the path of a FashionGen-layout h5 file.
    ``per_attribute`` caps the triplets per edited attribute (drawn at random, seeded);
    ``max_gallery`` keeps only the first N products (quick runs).
    """
    if not isinstance(catalogue, (str, Path)):
        source = repr(catalogue)
    else:
        source = str(catalogue)
        catalogue = open_catalogue(catalogue)
    attributes = tuple(attributes)
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown attribute(s) {unknown}; choose from {ATTRIBUTES}")
    products = read_products(catalogue, colours)
    if max_gallery is not None:
        products = products[:max_gallery]
    if len({p.image for p in products}) != len(products):
        raise ValueError("product ids are not unique in this catalogue (after making them file-safe); "
                         "they name the images")
    rng = random.Random(seed)
    out = Path(out_dir)
    for sub in ("captions", "image_splits", "images"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    gallery = [p.image for p in products]
    edits, counts = [], {}
    for attribute in attributes:
        pairs = find_pairs(products, attribute)
        chosen = rng.sample(pairs, min(per_attribute, len(pairs)))
        rows = []
        for ref, tgt in chosen:
            old, new = ref.value(attribute), tgt.value(attribute)
            captions = edit_captions(attribute, wording(ref, attribute), wording(tgt, attribute), rng)
            rows.append({"candidate": ref.image, "target": tgt.image, "captions": captions})
            edits.append({"category": attribute, "index": len(rows) - 1, "attribute": attribute,
                          "reference": ref.image, "target": tgt.image, "from": old, "to": new})
        counts[attribute] = len(rows)
        _write_json(out / "captions" / f"cap.{attribute}.{split}.json", rows)
        _write_json(out / "image_splits" / f"split.{attribute}.{split}.json", gallery)

    for p in products:
        path = out / "images" / f"{p.image}.png"
        if not path.exists():
            catalogue.load_image(p.index, 0).save(path)
    _write_json(out / f"edits.{split}.json", edits)
    _write_json(out / f"reference_captions.{split}.json", {p.image: p.caption() for p in products})
    _write_json(out / f"products.{split}.json", {
        p.image: {"colour": p.colour, "brand": p.brand, "fabric": p.fabric, "subcategory": p.subcategory,
                  "title": p.title, "text": p.text} for p in products})
    vocab_path = out / "vocab.json"
    vocab = vocabulary(products)
    if vocab_path.is_file():  # several splits share one vocabulary file
        old = json.loads(vocab_path.read_text())
        vocab = {k: sorted(set(vocab[k]) | set(old.get(k, []))) for k in vocab}
    _write_json(vocab_path, vocab)
    summary = {"source": source, "split": split, "products": len(products), "triplets": counts}
    _write_json(out / f"summary.{split}.json", summary)
    return summary


def rewriter_for(root: str | Path) -> RuleRewriter:
    """The rule rewriter with the vocabulary the builder wrote next to the data (or the default)."""
    path = Path(root) / "vocab.json"
    return RuleRewriter.from_vocab(path) if path.is_file() else RuleRewriter()


def load_edits(root: str | Path, split: str = "val") -> list[dict]:
    path = Path(root) / f"edits.{split}.json"
    if not path.is_file():
        raise FileNotFoundError(f"edits file not found: {path} (written by the synthetic builder)")
    return json.loads(path.read_text())


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False))
