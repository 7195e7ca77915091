"""FashionIQ: its file layout, its queries and its metrics (R@10, R@50 per category and averaged).

Layout (as distributed, and as the synthetic builder writes it)::

    root/captions/cap.{category}.{split}.json        [{"candidate", "target", "captions": [c1, c2]}]
    root/image_splits/split.{category}.{split}.json  [image name, ...]   (the category's gallery)
    root/images/{name}.png | .jpg | .jpeg

"candidate" is the reference image. The gallery of a category is its image split, and the target of
every query must be in it exactly once.

Protocol, as in the public CIReVL and SEARLE evaluation code: the two relative captions are joined
as "{c1} and {c2}" (trailing ".?, " stripped); similarities are cosine; the reference image is NOT
removed from the gallery ranking on FashionIQ (both remove it only on CIRR). ``exclude_reference``
offers the CIRR-style variant. Ties count against the query (a target sharing its score with other
images ranks after all of them), so a degenerate encoder cannot score well by accident.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_KS = (10, 50)


@dataclass(frozen=True)
class Triplet:
    """One composed query: reference image + relative captions -> target image."""
    reference: str
    target: Optional[str]  # None in the test split, which has no published targets
    captions: tuple[str, ...]
    category: str

    @property
    def modification(self) -> str:
        return join_captions(self.captions)


def join_captions(captions: Sequence[str], reverse: bool = False) -> str:
    """FashionIQ's two relative captions as one instruction: "{c1} and {c2}"."""
    parts = [c.strip(".?, ") for c in captions if c and c.strip(".?, ")]
    if reverse:
        parts = parts[::-1]
    return " and ".join(parts)


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"FashionIQ {what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


class FashionIQ:
    """Read a FashionIQ-layout folder.

    Args:
        root: the folder holding ``captions/``, ``image_splits/`` and ``images/``.
        split: "train", "val" or "test".
        categories: which categories to use; None finds every category that has both a captions
            file and a split file for ``split`` (so synthetic sets with other category names work).
    """

    def __init__(self, root: str | Path, split: str = "val", categories: Optional[Iterable[str]] = None):
        self.root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        for sub in ("captions", "image_splits", "images"):
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(
                    f"{self.root} is not a FashionIQ-layout folder: missing '{sub}/' (expected "
                    "captions/cap.<category>.<split>.json, image_splits/split.<category>.<split>.json, images/)")
        self.categories = tuple(categories) if categories is not None else self._discover()
        if not self.categories:
            raise FileNotFoundError(f"no captions/cap.<category>.{split}.json with a matching "
                                    f"image_splits/split.<category>.{split}.json under {self.root}")
        self._triplets = {c: self._load_triplets(c) for c in self.categories}
        self._galleries = {c: self._load_gallery(c) for c in self.categories}
        self._check_targets()
        self._paths: dict[str, Path] = {}

    def _discover(self) -> tuple[str, ...]:
        found = []
        for path in sorted((self.root / "captions").glob(f"cap.*.{self.split}.json")):
            category = path.name[len("cap."):-len(f".{self.split}.json")]
            if (self.root / "image_splits" / f"split.{category}.{self.split}.json").is_file():
                found.append(category)
        known = [c for c in CATEGORIES if c in found]  # FashionIQ's own order first
        return tuple(known + [c for c in found if c not in known])

    def _load_triplets(self, category: str) -> list[Triplet]:
        path = self.root / "captions" / f"cap.{category}.{self.split}.json"
        rows = _read_json(path, "captions file")
        triplets = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "candidate" not in row or "captions" not in row:
                raise ValueError(f"{path}: entry {i} needs keys 'candidate', 'captions' (and 'target'), got {row!r}")
            if self.split != "test" and "target" not in row:
                raise ValueError(f"{path}: entry {i} has no 'target'")
            captions = row["captions"]
            if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"{path}: entry {i}: 'captions' must be a list of strings")
            triplets.append(Triplet(str(row["candidate"]), None if row.get("target") is None else str(row["target"]),
                                    tuple(captions), category))
        return triplets

    def _load_gallery(self, category: str) -> list[str]:
        path = self.root / "image_splits" / f"split.{category}.{self.split}.json"
        names = [str(n) for n in _read_json(path, "image split file")]
        if len(set(names)) != len(names):
            raise ValueError(f"{path}: the gallery lists some images more than once")
        return names

    def _check_targets(self) -> None:
        for c in self.categories:
            gallery = set(self._galleries[c])
            missing = sorted({t.target for t in self._triplets[c] if t.target is not None} - gallery)
            if missing:
                raise ValueError(f"category {c!r}: {len(missing)} target(s) are not in "
                                 f"split.{c}.{self.split}.json, e.g. {missing[:3]}")

    # -- access -------------------------------------------------------------------------------------
    def triplets(self, category: Optional[str] = None) -> list[Triplet]:
        if category is None:
            return [t for c in self.categories for t in self._triplets[c]]
        return self._triplets[self._category(category)]

    def gallery(self, category: str) -> list[str]:
        return self._galleries[self._category(category)]

    def image_names(self) -> list[str]:
        """Every image a query or gallery refers to, once, in a stable order."""
        names = [n for c in self.categories for n in self._galleries[c]]
        names += [t.reference for c in self.categories for t in self._triplets[c]]
        return list(dict.fromkeys(names))

    def _category(self, category: str) -> str:
        if category not in self._triplets:
            raise KeyError(f"unknown category {category!r}; this dataset has {list(self.categories)}")
        return category

    def image_path(self, name: str) -> Path:
        if name not in self._paths:
            for ext in ("", *IMAGE_EXTENSIONS):
                path = self.root / "images" / f"{name}{ext}"
                if path.is_file():
                    self._paths[name] = path
                    break
            else:
                raise FileNotFoundError(f"image {name!r} not found in {self.root / 'images'} "
                                        f"(tried {', '.join(IMAGE_EXTENSIONS)})")
        return self._paths[name]

    def load_image(self, name: str) -> Image.Image:
        with Image.open(self.image_path(name)) as im:
            return im.convert("RGB")

    def __repr__(self) -> str:
        counts = {c: len(self._triplets[c]) for c in self.categories}
        return f"FashionIQ('{self.root}', split={self.split!r}, queries={counts})"


# -- metrics ----------------------------------------------------------------------------------------
def target_ranks(scores: torch.Tensor, target_index: torch.Tensor,
                 exclude_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """0-based rank of each query's target in its row of ``scores`` [Q, G] (higher = better).

    ``exclude_index`` (or -1 per row) drops one gallery item per query from the ranking, e.g. the
    reference image; it is never dropped when it is the target itself.
    """
    scores = scores.float()
    q = torch.arange(scores.shape[0])
    target_score = scores[q, target_index]
    ahead = scores >= target_score[:, None]
    ahead[q, target_index] = False  # the target does not rank ahead of itself
    if exclude_index is not None:
        valid = (exclude_index >= 0) & (exclude_index != target_index)
        ahead[q[valid], exclude_index[valid]] = False
    return ahead.sum(dim=1)


def recall_at_k(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Percentage of queries whose target ranks within the top k."""
    if ranks.numel() == 0:
        return {f"R@{k}": float("nan") for k in ks}
    return {f"R@{k}": (ranks < k).float().mean().item() * 100 for k in ks}


def ranked_names_recall(ranked: Sequence[Sequence[str]], targets: Sequence[str],
                        ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@k from explicit rankings (lists of gallery names, best first)."""
    ranks = [list(r).index(t) if t in r else len(r) for r, t in zip(ranked, targets)]
    return recall_at_k(torch.tensor(ranks), ks)


def average_report(per_category: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Add FashionIQ's "average" row: the unweighted mean of the per-category recalls."""
    report = dict(per_category)
    keys = [k for k in next(iter(per_category.values()), {}) if k.startswith("R@")]
    report["average"] = {k: sum(r[k] for r in per_category.values()) / len(per_category) for k in keys}
    if all("queries" in r for r in per_category.values()):
        report["average"]["queries"] = sum(r["queries"] for r in per_category.values())
    return report


# -- the evaluation loop, shared by every method -----------------------------------------------------
class Composer(Protocol):
    """A composed-retrieval method: queries -> one embedding each, in the gallery's space."""

    def compose(self, triplets: list[Triplet], dataset: FashionIQ) -> torch.Tensor: ...


def evaluate(dataset: FashionIQ, composer: Composer, gallery_features: Callable[[list[str]], torch.Tensor],
             categories: Optional[Iterable[str]] = None, ks: Sequence[int] = DEFAULT_KS,
             exclude_reference: bool = False) -> dict[str, dict[str, float]]:
    """R@k per category plus their average.

    ``gallery_features(names) -> [G, D]`` embeds gallery images (normalized here);
    ``composer.compose`` embeds the queries.
    """
    per_category = {}
    for category in categories or dataset.categories:
        triplets = [t for t in dataset.triplets(category) if t.target is not None]
        gallery = dataset.gallery(category)
        if not triplets:
            continue
        index = {n: i for i, n in enumerate(gallery)}
        images = F.normalize(gallery_features(gallery).float(), dim=-1)
        queries = F.normalize(composer.compose(triplets, dataset).float().to(images.device), dim=-1)
        targets = torch.tensor([index[t.target] for t in triplets])
        exclude = torch.tensor([index.get(t.reference, -1) for t in triplets]) if exclude_reference else None
        ranks = target_ranks((queries @ images.T).cpu(), targets, exclude)
        per_category[category] = {**recall_at_k(ranks, ks), "queries": len(triplets)}
    if not per_category:
        raise ValueError(f"no queries with targets in {dataset!r}")
    return average_report(per_category)


def markdown_table(columns: dict[str, dict[str, dict[str, float]]], ks: Sequence[int] = DEFAULT_KS,
                   row_header: str = "category") -> str:
    """Reports side by side: one row per category (then "average"), R@k columns per report."""
    rows = list(dict.fromkeys(r for report in columns.values() for r in report if r != "average"))
    rows.append("average")
    head = [row_header] + [f"{name} R@{k}" for name in columns for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row]
        for report in columns.values():
            cells += [f"{report[row][f'R@{k}']:.1f}" if row in report else "-" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
