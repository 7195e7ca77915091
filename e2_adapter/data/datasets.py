"""Torch datasets over any ``ProductCatalogue``, and the batch collate.

``transform`` is any callable PIL image -> tensor (open_clip's ``preprocess``,
or ``default_transform``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from ..backends.base import CLIP_MEAN, CLIP_STD
from .catalogue import ProductCatalogue


Transform = Callable[[Image.Image], torch.Tensor]


def default_transform(image_size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                      std: Sequence[float] = CLIP_STD) -> Transform:
    """CLIP's evaluation preprocessing: bicubic resize of the short side, centre crop, normalize."""
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


class TrainViews(Dataset):
    """One item per product, with a random view each time (the reference recipe).

    The view is drawn from torch's global RNG, which DataLoader seeds per worker
    from its generator, so a seeded loader (and a resumed one) draws the same views.
    """

    def __init__(self, catalogue: ProductCatalogue, transform: Transform):
        self.catalogue = catalogue
        self.transform = transform

    def __len__(self) -> int:
        return len(self.catalogue)

    def __getitem__(self, key: int | tuple[int, ...]) -> dict[str, Any]:
        # A (product, view) key fixes the view: the trainer's sampler picks views itself so
        # that a resumed run sees exactly the data of an uninterrupted one. A third element picks
        # the caption style of a catalogue that has several (``MixedCaptions``).
        if isinstance(key, tuple):
            p, view, *style = key
        else:
            p, n, style = key, self.catalogue.num_views(key), []
            view = int(torch.randint(n, ()).item()) if n > 1 else 0
        return {
            "image": self.transform(self.catalogue.load_image(p, view)),
            "text": self.catalogue.styled_text(p, style[0]) if style else self.catalogue.text(p),
            "tags": self.catalogue.tags(p),
            "product": p,
        }


class EvalImages(Dataset):
    """Images for evaluation: the first view of each product, or every view.

    Items carry ``product`` (and ``view``) so image-level protocols can map images
    back to products.
    """

    def __init__(self, catalogue: ProductCatalogue, transform: Transform, views: str = "first"):
        if views not in ("first", "all"):
            raise ValueError(f"views must be 'first' or 'all', got {views!r}")
        self.catalogue = catalogue
        self.transform = transform
        self.views = views
        if views == "first":
            self._items = [(p, 0) for p in range(len(catalogue))]
        else:
            self._items = [(p, v) for p in range(len(catalogue))
                           for v in range(catalogue.num_views(p))]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def products(self) -> list[int]:
        """Product index of every item, in item order (labels for image-full retrieval)."""
        return [p for p, _ in self._items]

    def __getitem__(self, i: int) -> dict[str, Any]:
        p, view = self._items[i]
        return {"image": self.transform(self.catalogue.load_image(p, view)),
                "product": p, "view": view}


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, make int tensors of ints, keep strings as lists, tags as entity -> list."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for key, first in batch[0].items():
        values = [item[key] for item in batch]
        if isinstance(first, torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(first, dict):
            out[key] = {k: [v[k] for v in values] for k in first}
        elif isinstance(first, int) and not isinstance(first, bool):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out
