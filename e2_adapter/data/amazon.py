"""AmazonFashion reader (the paper's second benchmark; docs/method.md, section 4).

Amazon Reviews fashion metadata plus a split file and a local image folder.
Text = brand + ". " + title; the only tag entity is brand; there is no
sub-category, so ``group`` is "".

Accepted layouts (the public metadata comes in several):

- metadata: JSON lines, one object per line with ``asin``, ``title``, ``brand``
  (the 2014 dumps write Python dict literals instead of JSON: also accepted);
  or one JSON object mapping asin -> record (the E2 reference's ``meta-fashion.json``);
  or a JSON list of records.
- split: a text file with one asin per line, or JSON ``{"train": [...], "test": [...]}``
  (then ``split=`` picks the list). Without a split file every product with metadata is used.
- images: if a record lists ``images`` (file names, as in the reference layout), each is
  a view, looked up as ``image_dir/<asin>/<name>`` then ``image_dir/<name>``; otherwise
  the single view ``image_dir/<asin>.jpg`` (also .jpeg / .png).
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Optional


from .catalogue import DataFormatError, ImageFileCatalogue, examples_of

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _parse_record_line(line: str, path: Path, lineno: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        pass
    try:  # 2014 Amazon dumps: Python literals, e.g. {'asin': 'B00...', 'title': ...}
        record = ast.literal_eval(line)
    except (ValueError, SyntaxError) as err:
        raise DataFormatError(f"{path}, line {lineno}: neither JSON nor a Python dict literal "
                              f"({err}). Expected one metadata record per line.") from err
    if not isinstance(record, dict):
        raise DataFormatError(f"{path}, line {lineno}: expected an object, "
                              f"got {type(record).__name__}")
    return record


def _read_json_or_lines(path: Path, what: str, expected: str):
    """The file's text, and its value when it is one JSON document (None for JSON lines / plain lines)."""
    if not path.is_file():
        raise DataFormatError(f"AmazonFashion {what} not found: {path}. Expected {expected}.")
    raw = path.read_text(encoding="utf-8")
    try:
        return raw, json.loads(raw)
    except json.JSONDecodeError:
        return raw, None


def read_amazon_metadata(path: str | os.PathLike) -> dict[str, dict]:
    """asin -> metadata record, from any of the layouts in the module docstring."""
    path = Path(path)
    raw, whole = _read_json_or_lines(path, "metadata", "the Amazon Reviews fashion metadata "
                                     "(JSON lines with asin, title, brand)")
    if isinstance(whole, dict) and "asin" not in whole:
        bad = [asin for asin, rec in whole.items() if not isinstance(rec, dict)]
        if bad:
            raise DataFormatError(f"{path}: a JSON object must map asin -> record object; "
                                  f"not an object for {examples_of(bad)}.")
        records = [{"asin": asin, **rec} for asin, rec in whole.items()]
    elif isinstance(whole, list):
        records = whole
    else:
        records = [whole] if isinstance(whole, dict) else [
            _parse_record_line(line, path, i + 1)
            for i, line in enumerate(raw.splitlines()) if line.strip()]
    out: dict[str, dict] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict) or "asin" not in record:
            raise DataFormatError(f"{path}: record {i} has no 'asin' field; every metadata "
                                  f"record needs its product's asin.")
        out[str(record["asin"])] = record
    if not out:
        raise DataFormatError(f"{path}: no metadata records found (empty file).")
    return out


def read_amazon_split(path: str | os.PathLike, split: str = "train") -> list[str]:
    """The asins of one split: plain lines, or JSON {split_name: [asins]}."""
    path = Path(path)
    raw, parsed = _read_json_or_lines(path, "split file", 'one asin per line, or JSON {"train": [...], "test": [...]}')
    if isinstance(parsed, dict):
        if split not in parsed:
            raise DataFormatError(f"{path}: no split '{split}'; the file has {sorted(parsed)}.")
        asins = [str(a) for a in parsed[split]]
    elif isinstance(parsed, list):
        asins = [str(a) for a in parsed]
    else:
        asins = [line.strip() for line in raw.splitlines() if line.strip()]
    if not asins:
        raise DataFormatError(f"{path}: split '{split}' is empty.")
    return list(dict.fromkeys(asins))  # drop repeats, keep order


class AmazonFashion(ImageFileCatalogue):
    """AmazonFashion products.

    Args:
        metadata: metadata file (see module docstring).
        image_dir: folder with the images.
        split_file: optional split file; ``split`` names the list in a JSON split file.
        skip_missing: drop products without metadata or images instead of raising.
        check_images: verify every image file up front (not empty, a readable image), so a bad file
            is a clear error now rather than a crash mid-epoch.
        bad_images: "error" (default) stops naming the files; "skip" leaves those views out (and
            products left with none), with a warning giving the count.
    """

    entities = ("brand",)

    def __init__(self, metadata: str | os.PathLike, image_dir: str | os.PathLike,
                 split_file: Optional[str | os.PathLike] = None, split: str = "train",
                 skip_missing: bool = False, check_images: bool = True, bad_images: str = "error"):
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise DataFormatError(f"AmazonFashion image folder not found: {self.image_dir}.")
        records = read_amazon_metadata(metadata)
        asins = read_amazon_split(split_file, split) if split_file is not None else list(records)

        no_meta = [a for a in asins if a not in records]
        if no_meta and not skip_missing:
            raise DataFormatError(
                f"{len(no_meta)} asin(s) of the split have no metadata in {metadata}: "
                f"{examples_of(no_meta)}. Fix the split, or pass skip_missing=True.")
        self._asins: list[str] = []
        self._records: list[dict] = []
        self._images: list[list[Path]] = []
        no_image: list[str] = []
        for asin in asins:
            if asin not in records:
                continue
            paths = self._find_images(asin, records[asin])
            if not paths:
                no_image.append(asin)
                continue
            self._asins.append(asin)
            self._records.append(records[asin])
            self._images.append(paths)
        if no_image and not skip_missing:
            raise DataFormatError(
                f"{len(no_image)} product(s) have no image in {self.image_dir}: "
                f"{examples_of(no_image)}. Expected <asin>.jpg (or the files listed in the record's "
                f"'images'); download them, or pass skip_missing=True.")
        if not self._asins:
            raise DataFormatError(f"no AmazonFashion product has both metadata and an image "
                                  f"(metadata {metadata}, images {self.image_dir}).")
        if check_images:
            self._check_images(self.image_dir, bad_images)

    def _keep_products(self, keep: list[int]) -> None:
        self._asins = [self._asins[i] for i in keep]
        self._records = [self._records[i] for i in keep]

    def _find_images(self, asin: str, record: dict) -> list[Path]:
        names = record.get("images")
        if isinstance(names, (list, tuple)) and names:
            found = []
            for name in names:
                for candidate in (self.image_dir / asin / str(name), self.image_dir / str(name)):
                    if candidate.is_file():
                        found.append(candidate)
                        break
                else:
                    return []  # a listed view is missing: report the product
            return found
        for ext in IMAGE_EXTENSIONS:
            candidate = self.image_dir / f"{asin}{ext}"
            if candidate.is_file():
                return [candidate]
        return []

    def __len__(self) -> int:
        return len(self._asins)

    def _field(self, p: int, key: str) -> str:
        value = self._records[self._check_product(p)].get(key)
        return "" if value is None else str(value).strip()

    def text(self, p: int) -> str:
        brand, title = self._field(p, "brand"), self._field(p, "title")
        return f"{brand}. {title}" if brand else title

    def tags(self, p: int) -> dict[str, str]:
        return {"brand": self._field(p, "brand")}

    def product_id(self, p: int) -> str:
        return self._asins[self._check_product(p)]
