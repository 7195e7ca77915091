"""The one interface every product source answers.

Training and evaluation only ever talk to a ``ProductCatalogue``, so FashionGen,
FashionSynth, AmazonFashion and a user's own CSV are interchangeable. A
catalogue is a list of *products*; each product has one text, one raw value per
tag entity and one or more images (*views*).
"""

from __future__ import annotations

import abc
import warnings
from typing import Optional

from PIL import Image

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive

SHOW = 5  # how many offending names an error message lists


def examples_of(items) -> str:
    """The first few of ``items`` for an error message, with how many more there are."""
    items = [str(i) for i in items]
    more = f" (and {len(items) - SHOW} more)" if len(items) > SHOW else ""
    return ", ".join(items[:SHOW]) + more


class DataFormatError(ValueError):
    """A data file is missing or not laid out as expected.

    Messages name the file, the offending key or column, and how to fix it.
    """


class ProductCatalogue(abc.ABC):
    """Abstract product catalogue; products are indexed ``0 .. len(self) - 1``."""

    #: tag entity names, e.g. ("brand", "season", "subcategory", "composition")
    entities: tuple[str, ...] = ()

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of products."""

    @abc.abstractmethod
    def num_views(self, p: int) -> int:
        """Number of images of product ``p`` (at least 1)."""

    @abc.abstractmethod
    def load_image(self, p: int, view: int = 0) -> Image.Image:
        """View ``view`` of product ``p`` as an RGB PIL image."""

    @abc.abstractmethod
    def text(self, p: int) -> str:
        """The training text of product ``p``."""

    @abc.abstractmethod
    def tags(self, p: int) -> dict[str, str]:
        """Raw tag value of product ``p`` for every entity in ``self.entities``."""

    def group(self, p: int) -> str:
        """Sub-category of product ``p`` (the sample-100 protocol groups by it); "" if unknown."""
        self._check_product(p)
        return ""

    def product_id(self, p: int) -> str:
        """The source's own identifier of product ``p`` (as a string for every source)."""
        self._check_product(p)
        return str(p)

    def regions(self, p: int, view: int = 0) -> Optional[dict[str, Box]]:
        """Entity boxes of one view, where the source knows them (synthetic data); else None."""
        self._check_view(p, view)
        return None

    # Bulk accessors: evaluation needs every text / group at once. Readers whose
    # per-item access is slow (h5) override these with column reads.
    def texts(self) -> list[str]:
        return [self.text(p) for p in range(len(self))]

    def groups(self) -> list[str]:
        return [self.group(p) for p in range(len(self))]

    def product_ids(self) -> list[str]:
        return [self.product_id(p) for p in range(len(self))]

    def all_tags(self) -> dict[str, list[str]]:
        """Entity -> the tag value of every product (linear probing, vocabularies)."""
        rows = [self.tags(p) for p in range(len(self))]
        return {e: [r[e] for r in rows] for e in self.entities}

    # -- helpers for subclasses -------------------------------------------------
    def _check_product(self, p: int) -> int:
        n = len(self)
        if not -n <= p < n:
            raise IndexError(f"product index {p} out of range for {n} products")
        return p % n

    def _check_view(self, p: int, view: int) -> tuple[int, int]:
        p = self._check_product(p)
        n = self.num_views(p)
        if not 0 <= view < n:
            raise IndexError(f"view {view} out of range: product {p} has {n} view(s)")
        return p, view

    def __repr__(self) -> str:
        return f"{type(self).__name__}(products={len(self)}, entities={self.entities})"


class ImageFileCatalogue(ProductCatalogue):
    """A catalogue whose views are image files on disk: ``self._images[p]`` lists product p's paths."""

    _images: list

    def num_views(self, p: int) -> int:
        return len(self._images[self._check_product(p)])

    def load_image(self, p: int, view: int = 0) -> Image.Image:
        p, view = self._check_view(p, view)
        with Image.open(self._images[p][view]) as im:
            return im.convert("RGB")

    def _keep_products(self, keep: list[int]) -> None:
        """Keep only products ``keep`` (in order): each reader filters its own per-product lists."""
        raise NotImplementedError

    def _check_images(self, source, bad_images: str, hint: str = "") -> None:
        """Check every image file up front, so a bad file is an error now and not a crash mid-epoch.

        ``bad_images``: "error" raises naming the files; "skip" drops those views (and products left
        with none) with a warning giving the count.
        """
        if bad_images not in ("error", "skip"):
            raise ValueError(f"bad_images must be 'error' or 'skip', got {bad_images!r}")
        problems = {p: why for views in self._images for p in views if (why := image_problem(p))}
        if not problems:
            return
        listed = examples_of(f"{p} ({why})" for p, why in problems.items())
        if bad_images == "error":
            raise DataFormatError(f"{source}: {len(problems)} image file(s) cannot be used: {listed}. "
                                  f"{hint}Fix or remove them, or skip them with --skip-bad-images "
                                  f"(bad_images='skip').")
        keep = [i for i, views in enumerate(self._images) if any(p not in problems for p in views)]
        if not keep:
            raise DataFormatError(f"{source}: no product has a usable image: {listed}")
        self._images = [[p for p in self._images[i] if p not in problems] for i in keep]
        self._keep_products(keep)
        warnings.warn(f"{source}: skipped {len(problems)} unusable image file(s) ({listed}); "
                      f"{len(keep)} product(s) remain", UserWarning, stacklevel=3)


# -- checks shared by the readers -----------------------------------------------------------------

def image_problem(path) -> Optional[str]:
    """Why the image file at ``path`` cannot be trained on (missing, empty, not a readable image), or None."""
    import os
    try:
        size = os.path.getsize(path)
    except OSError:
        return "not found"
    if size == 0:
        return "empty (0 bytes)"
    try:
        with Image.open(path) as im:
            im.verify()  # reads the whole file: catches truncation, not only a bad header
    except Exception as err:  # PIL raises many types for corrupt files
        return f"not a readable image ({type(err).__name__})"
    return None


def looks_double_encoded(text: str) -> bool:
    """True for mojibake such as 'CafÃ©': UTF-8 bytes read as latin-1 / cp1252 (the fix round-trips)."""
    if text.isascii():
        return False
    for wrong in ("latin-1", "cp1252"):
        try:
            return text.encode(wrong).decode("utf-8") != text
        except UnicodeError:
            continue
    return False
