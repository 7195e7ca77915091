"""A user's own catalogue: a CSV / TSV / JSONL manifest, one row per image.

Columns: an image path (relative paths are resolved against the manifest's
folder, or ``image_root``), a text, optionally a product id (rows with the same
id are views of one product; without it every row is its own product), optionally
a group (sub-category) column, and any tag columns, which become the entities.
Text, tags and group of a product are taken from its first row.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence


from .catalogue import SHOW, DataFormatError, ImageFileCatalogue

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


def _read_rows(path: Path, fmt: str, encoding: str = "utf-8-sig") -> tuple[list[dict[str, str]], list[str]]:
    """All rows as str -> str dicts, and the column names seen; a wrong encoding names the file."""
    try:
        return _parse_rows(path, fmt, encoding)
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise DataFormatError(f"{path}, line {line}: not valid {err.encoding} text (byte {err.object[err.start]:#04x}); "
                              f"pass the file's encoding, e.g. --encoding latin-1 (encoding='latin-1')") from None


def _parse_rows(path: Path, fmt: str, encoding: str) -> tuple[list[dict[str, str]], list[str]]:
    if fmt in ("csv", "tsv"):
        with path.open(newline="", encoding=encoding) as fh:  # utf-8-sig by default: Excel writes a BOM
            reader = csv.DictReader(fh, delimiter="\t" if fmt == "tsv" else ",")
            rows = [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]
            return rows, list(reader.fieldnames or [])
    raw = path.read_text(encoding=encoding)
    try:
        whole = json.loads(raw)
        records = whole if isinstance(whole, list) else [whole]
    except json.JSONDecodeError:
        records = []
        for i, line in enumerate(raw.splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}, line {i + 1}: not valid JSON ({err}).") from err
    columns: dict[str, None] = {}
    rows = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataFormatError(f"{path}: record {i} is a {type(record).__name__}, "
                                  f"expected an object.")
        columns.update(dict.fromkeys(record))
        rows.append({k: "" if v is None else str(v) for k, v in record.items()})
    return rows, list(columns)


class ManifestCatalogue(ImageFileCatalogue):
    """Products listed in a manifest file.

    Args:
        path: ``.csv``, ``.tsv``, ``.jsonl`` / ``.ndjson`` / ``.json`` (or pass ``format``).
        image_column, text_column: names of the image path and text columns.
        product_column: rows sharing this value are views of one product.
        tag_columns: entity names that are also column names, or a mapping
            entity -> column (e.g. ``{"brand": "designer"}``).
        group_column: the sub-category column (used by the sample-100 protocol).
        image_root: base folder for relative image paths (default: the manifest's folder).
        check_images: verify every image file up front: present, not empty, a readable image (a clear
            error, not a crash mid-epoch).
        bad_images: "error" (default) stops on the first check that fails, naming the files; "skip"
            leaves those views out (and products left with none), with a warning giving the count.
        encoding: text encoding of the manifest (default UTF-8, with or without a BOM).
    """

    def __init__(self, path: str | os.PathLike, image_column: str = "image",
                 text_column: str = "text", product_column: Optional[str] = None,
                 tag_columns: Sequence[str] | Mapping[str, str] = (),
                 group_column: Optional[str] = None, image_root: Optional[str | os.PathLike] = None,
                 check_images: bool = True, format: Optional[str] = None, bad_images: str = "error",
                 encoding: str = "utf-8-sig"):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataFormatError(f"manifest not found: {self.path}")
        fmt = format or _FORMATS.get(self.path.suffix.lower())
        if fmt not in ("csv", "tsv", "jsonl"):
            raise DataFormatError(f"{self.path}: unknown manifest format; use a .csv, .tsv or "
                                  f".jsonl file, or pass format='csv' | 'tsv' | 'jsonl'.")
        if isinstance(tag_columns, Mapping):
            tag_map = dict(tag_columns)
        else:
            tag_map = {c: c for c in tag_columns}
        self.entities = tuple(tag_map)
        self._tag_map = tag_map

        rows, found = _read_rows(self.path, fmt, encoding)
        if not rows:
            raise DataFormatError(f"{self.path}: the manifest has no rows.")
        needed = [image_column, text_column, *tag_map.values()]
        needed += [c for c in (product_column, group_column) if c is not None]
        missing = [c for c in dict.fromkeys(needed) if c not in found]
        if missing:
            raise DataFormatError(f"{self.path}: missing column(s) {missing}; the manifest has "
                                  f"columns {found}. Rename them or pass the right *_column= / "
                                  f"tag_columns= names.")
        incomplete = [i for i, r in enumerate(rows) if any(c not in r for c in needed)]
        if incomplete:
            raise DataFormatError(f"{self.path}: record(s) {incomplete[:SHOW]} lack some of the "
                                  f"columns {needed}.")

        root = Path(image_root) if image_root is not None else self.path.parent
        self._first: list[dict[str, str]] = []   # first row of each product
        self._images: list[list[Path]] = []
        self._ids: list[str] = []
        index: dict[str, int] = {}
        for i, row in enumerate(rows):
            pid = row[product_column] if product_column is not None else str(i)
            image = Path(row[image_column]).expanduser()
            image = image if image.is_absolute() else root / image
            if pid not in index:
                index[pid] = len(self._ids)
                self._ids.append(pid)
                self._first.append(row)
                self._images.append([])
            self._images[index[pid]].append(image)
        self._text_column, self._group_column = text_column, group_column

        if check_images:
            self._check_images(self.path, bad_images, hint=f"Relative paths are resolved against {root} "
                                                             f"(image_root= changes that). ")

    def _keep_products(self, keep: list[int]) -> None:
        self._ids = [self._ids[i] for i in keep]
        self._first = [self._first[i] for i in keep]

    def __len__(self) -> int:
        return len(self._ids)

    def text(self, p: int) -> str:
        return self._first[self._check_product(p)][self._text_column].strip()

    def tags(self, p: int) -> dict[str, str]:
        row = self._first[self._check_product(p)]
        return {e: row[c].strip() for e, c in self._tag_map.items()}

    def group(self, p: int) -> str:
        row = self._first[self._check_product(p)]
        return row[self._group_column].strip() if self._group_column else ""

    def product_id(self, p: int) -> str:
        return self._ids[self._check_product(p)]
