"""FashionGen h5 reader (``fashiongen_256_256_{train,validation}.h5``).

Also reads FashionSynth files, which use the same schema plus optional
``region_<entity>`` keys (ground-truth entity boxes).

Layout (docs/method.md, section 4): one row per image; strings are fixed-length
byte arrays of shape (N, 1) in latin-1; ``input_image`` is uint8 N x H x W x 3;
rows of one product share ``input_productID`` (contiguous in the real files,
but grouping by id keeps us correct if they are not).
"""

from __future__ import annotations

import codecs
import os
import string
import warnings
from pathlib import Path
from typing import Optional, Sequence

import h5py
import numpy as np
from PIL import Image

from ..config import DEFAULT_ENTITIES
from .catalogue import Box, DataFormatError, ProductCatalogue, looks_double_encoded

FASHIONGEN_KEYS = (
    "index", "index_2", "input_brand", "input_category", "input_composition",
    "input_concat_description", "input_department", "input_description", "input_gender",
    "input_image", "input_msrpUSD", "input_name", "input_pose", "input_productID",
    "input_season", "input_subcategory",
)
FASHIONGEN_ENTITIES = DEFAULT_ENTITIES  # the paper's four entities are FashionGen's tags
ENTITY_KEYS = {e: f"input_{e}" for e in FASHIONGEN_ENTITIES}
# Fields a text template may use: every string column, by its short name.
TEXT_FIELDS = ("brand", "category", "composition", "concat_description", "department",
               "description", "gender", "name", "pose", "season", "subcategory")
# The reference's training text: composition. sub-category. brand. season. description
DEFAULT_TEXT_TEMPLATE = "{composition}. {subcategory}. {brand}. {season}. {description}"
IMAGE_KEY, ID_KEY, GROUP_KEY = "input_image", "input_productID", "input_subcategory"
REGION_PREFIX = "region_"

_HOW_TO_GET = ("FashionGen cannot be redistributed: request it from its authors, or write a "
               "synthetic stand-in with the same layout via `e2-adapter synth`.")
_COLUMN_CHUNK = 8192  # rows per read when scanning a whole string column
_ENCODING_SAMPLE = 256  # rows whose strings are checked against the encoding up front


def _decode(value, encoding: str) -> str:
    """One h5 string cell (shape (1,) array or scalar; bytes or str) -> str."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else b""
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode(encoding)
    return str(value).strip()


def _template_fields(template: str) -> list[str]:
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    unknown = sorted(set(fields) - set(TEXT_FIELDS))
    if unknown:
        raise ValueError(f"text template uses unknown field(s) {unknown}; "
                         f"available: {list(TEXT_FIELDS)}")
    return list(dict.fromkeys(fields))


class FashionGenH5(ProductCatalogue):
    """Products of one FashionGen-layout h5 file.

    Args:
        path: the ``.h5`` file.
        entities: which tag entities to expose (subset of brand, season,
            subcategory, composition), in this order.
        text_template: ``str.format`` template over ``TEXT_FIELDS``; tag fields are
            inserted without their trailing full stop so "100% cotton." does not
            become "100% cotton.. SHIRTS".
        max_products: keep only the first N products (quick runs, debugging).
        encoding: string encoding of the file (latin-1 for FashionGen).
    """

    def __init__(self, path: str | os.PathLike, entities: Sequence[str] = FASHIONGEN_ENTITIES,
                 text_template: str = DEFAULT_TEXT_TEMPLATE,
                 max_products: Optional[int] = None, encoding: str = "latin-1"):
        self.path = Path(path)
        self.entities = tuple(entities)
        unknown = [e for e in self.entities if e not in ENTITY_KEYS]
        if unknown or not self.entities:
            raise ValueError(f"entities must be a non-empty subset of {FASHIONGEN_ENTITIES}, "
                             f"got {list(entities)}")
        self.text_template = text_template
        self._text_fields = _template_fields(text_template)
        try:
            self.encoding = codecs.lookup(encoding).name
        except LookupError as err:
            raise ValueError(f"unknown text encoding {encoding!r} (--encoding); e.g. latin-1 or utf-8") from err
        if max_products is not None and max_products < 1:
            raise ValueError(f"max_products must be >= 1, got {max_products}")

        self.max_products = max_products
        self._h5: Optional[h5py.File] = None
        self._h5_pid: Optional[int] = None
        with self._open() as f:
            self._validate(f)
            self._check_encoding(f)
            ids = self._integer_ids(np.asarray(f[ID_KEY][()]).reshape(len(f[ID_KEY]), -1)[:, 0])
            self._region_keys = {e: REGION_PREFIX + e for e in self.entities
                                 if REGION_PREFIX + e in f}
        self._group_rows(ids, max_products)

    def with_text_template(self, text_template: str) -> "FashionGenH5":
        """The same products with their texts written by another template (``MixedCaptions``)."""
        return FashionGenH5(self.path, self.entities, text_template, self.max_products, self.encoding)

    # -- opening and validation -------------------------------------------------
    def _open(self) -> h5py.File:
        if not self.path.is_file():
            raise DataFormatError(f"FashionGen file not found: {self.path}. {_HOW_TO_GET}")
        try:
            return h5py.File(self.path, "r")
        except OSError as err:
            raise DataFormatError(f"{self.path} is not a readable HDF5 file ({err}). "
                                  f"Re-download or regenerate it.") from err

    def _required_keys(self) -> list[str]:
        keys = [IMAGE_KEY, ID_KEY, GROUP_KEY]
        keys += [ENTITY_KEYS[e] for e in self.entities]
        keys += [f"input_{name}" for name in self._text_fields]
        return list(dict.fromkeys(keys))

    def _validate(self, f: h5py.File) -> None:
        missing = [k for k in self._required_keys() if k not in f]
        if missing:
            raise DataFormatError(
                f"{self.path}: missing key(s) {missing}; found {sorted(f.keys())}. "
                f"This does not look like a FashionGen file; pass entities=/text_template= "
                f"that only use the keys present, or regenerate the file.")
        images = f[IMAGE_KEY]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataFormatError(
                f"{self.path}: key '{IMAGE_KEY}' must be a uint8 array N x H x W x 3, got "
                f"shape {images.shape} dtype {images.dtype}. Convert the images to 8-bit RGB.")
        n = images.shape[0]
        if n == 0:
            raise DataFormatError(f"{self.path}: the file is empty ('{IMAGE_KEY}' has 0 rows).")
        keys = self._required_keys() + [k for k in f if k.startswith(REGION_PREFIX)]
        wrong = {k: f[k].shape[0] for k in keys if f[k].shape[0] != n}
        if wrong:
            raise DataFormatError(
                f"{self.path}: row counts differ: '{IMAGE_KEY}' has {n} rows but {wrong}. "
                f"Every key needs one row per image; the file is truncated or corrupt.")

    def _integer_ids(self, ids: np.ndarray) -> np.ndarray:
        """FashionGen's product ids are integers; digit strings are accepted, anything else is an error."""
        if ids.dtype.kind in "iu":
            return ids
        if ids.dtype.kind == "f" and np.all(np.isfinite(ids)) and np.all(ids == np.round(ids)):
            return ids.astype(np.int64)
        try:
            return np.array([int(_decode(v, self.encoding)) for v in ids], dtype=np.int64)
        except (ValueError, TypeError):
            bad = next(v for v in ids if not _decode(v, self.encoding).lstrip("-").isdigit())
            raise DataFormatError(
                f"{self.path}: '{ID_KEY}' must hold integer product ids, found {_decode(bad, self.encoding)!r} "
                f"(dtype {ids.dtype}). Number the products (rows of one product share one integer id) "
                f"and rewrite the file, or use --format manifest, whose ids may be any text.") from None

    def _check_encoding(self, f: h5py.File) -> None:
        """Decode a sample of every string column: a wrong --encoding fails here, not mid-training, and
        UTF-8 text read as latin-1 (mojibake such as 'Ã©') is reported."""
        keys = [k for k in self._required_keys() if k not in (IMAGE_KEY, ID_KEY)]
        suspect = ""
        for key in keys:
            if f[key].dtype.kind not in "SOU":
                continue
            for value in f[key][:_ENCODING_SAMPLE]:
                try:
                    text = _decode(value, self.encoding)
                except UnicodeDecodeError as err:
                    raise DataFormatError(f"{self.path}: '{key}' is not valid {self.encoding} text ({err}); "
                                          f"pass the file's encoding, e.g. --encoding latin-1 "
                                          f"(FashionGen's own files are latin-1)") from None
                if not suspect and looks_double_encoded(text):
                    suspect = f"'{key}' holds {text[:60]!r}"
        if suspect:
            hint = "--encoding utf-8" if self.encoding != "utf-8" else "re-encode the file once (it is encoded twice)"
            warnings.warn(f"{self.path}: text looks double-encoded ({suspect}): UTF-8 bytes decoded as "
                          f"{self.encoding}; pass {hint}", UnicodeWarning, stacklevel=3)

    def _group_rows(self, ids: np.ndarray, max_products: Optional[int]) -> None:
        """Product p's rows are ``self._rows[self._offsets[p]:self._offsets[p + 1]]``."""
        _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        # Number products by first appearance, so file order is product order.
        rank = np.empty_like(first)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        product_of_row = rank[inverse]
        n_products = len(first)
        if max_products is not None:
            n_products = min(n_products, max_products)
            keep = product_of_row < n_products
        else:
            keep = np.ones(len(ids), dtype=bool)
        rows = np.flatnonzero(keep)
        order = np.argsort(product_of_row[rows], kind="stable")  # stable: view order = file order
        self._rows = rows[order]
        counts = np.bincount(product_of_row[rows], minlength=n_products)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._ids = ids[self._rows[self._offsets[:-1]]]

    # -- lazy, per-process handle -----------------------------------------------
    def _file(self) -> h5py.File:
        # h5py handles must not cross fork(): reopen in every DataLoader worker.
        if self._h5 is None or self._h5_pid != os.getpid():
            self._h5 = self._open()
            self._h5_pid = os.getpid()
        return self._h5

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_h5_pid"] = None
        return state

    def close(self) -> None:
        if self._h5 is not None and self._h5_pid == os.getpid():
            self._h5.close()
        self._h5 = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: h5py may already be gone
            pass

    # -- catalogue interface ----------------------------------------------------
    def __len__(self) -> int:
        return len(self._offsets) - 1

    def num_views(self, p: int) -> int:
        p = self._check_product(p)
        return int(self._offsets[p + 1] - self._offsets[p])

    def _row(self, p: int, view: int = 0) -> int:
        p, view = self._check_view(p, view)
        return int(self._rows[self._offsets[p] + view])

    def _string(self, key: str, row: int) -> str:
        return _decode(self._file()[key][row], self.encoding)

    def load_image(self, p: int, view: int = 0) -> Image.Image:
        return Image.fromarray(np.asarray(self._file()[IMAGE_KEY][self._row(p, view)]), "RGB")

    def _format_text(self, fields: dict[str, str]) -> str:
        tag_fields = set(ENTITY_KEYS)
        clean = {k: (v.rstrip(". ") if k in tag_fields else v) for k, v in fields.items()}
        return self.text_template.format(**clean)

    def text(self, p: int) -> str:
        row = self._row(p)
        return self._format_text({k: self._string(f"input_{k}", row) for k in self._text_fields})

    def tags(self, p: int) -> dict[str, str]:
        row = self._row(p)
        return {e: self._string(ENTITY_KEYS[e], row) for e in self.entities}

    def group(self, p: int) -> str:
        return self._string(GROUP_KEY, self._row(p))

    def product_id(self, p: int) -> str:
        return str(int(self._ids[self._check_product(p)]))  # ids are integers (checked on opening)

    def regions(self, p: int, view: int = 0) -> Optional[dict[str, Box]]:
        row = self._row(p, view)
        if not self._region_keys:
            return None
        f = self._file()
        return {e: tuple(int(v) for v in f[key][row]) for e, key in self._region_keys.items()}

    # -- bulk reads (evaluation) ------------------------------------------------
    def _first_row_column(self, key: str) -> list[str]:
        """Column ``key`` at every product's first row, read in large slices (fast on h5)."""
        firsts = self._rows[self._offsets[:-1]]
        order = np.argsort(firsts)
        out: list[str] = [""] * len(firsts)
        dset = self._file()[key]
        sorted_rows = firsts[order]
        for start in range(0, int(sorted_rows[-1]) + 1, _COLUMN_CHUNK):
            lo, hi = np.searchsorted(sorted_rows, [start, start + _COLUMN_CHUNK])
            if lo == hi:
                continue
            block = dset[start:start + _COLUMN_CHUNK]
            for i in range(lo, hi):
                out[order[i]] = _decode(block[sorted_rows[i] - start], self.encoding)
        return out

    def texts(self) -> list[str]:
        columns = {k: self._first_row_column(f"input_{k}") for k in self._text_fields}
        return [self._format_text({k: col[p] for k, col in columns.items()})
                for p in range(len(self))]

    def groups(self) -> list[str]:
        return self._first_row_column(GROUP_KEY)

    def all_tags(self) -> dict[str, list[str]]:
        """Entity -> the tag value of every product (linear probing, vocabularies)."""
        return {e: self._first_row_column(ENTITY_KEYS[e]) for e in self.entities}

    def product_ids(self) -> list[str]:
        return [str(int(i)) for i in self._ids]

    def __repr__(self) -> str:
        return (f"FashionGenH5('{self.path}', products={len(self)}, images={len(self._rows)}, "
                f"entities={self.entities})")
