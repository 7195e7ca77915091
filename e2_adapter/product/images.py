"""Image inputs for classify / tag / search: preprocessed tensors, PIL images, files or folders."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def list_image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such image file or folder")
    if not found:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {[str(p) for p in paths]}")
    return found


def open_image(item) -> Image.Image:
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    with Image.open(item) as im:
        return im.convert("RGB")


def image_sequence(images):
    """``images`` as something with len and slicing: a [B, 3, H, W] tensor, a list, a CatalogueImages;
    one image or path becomes a list of one."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"an image tensor must be [B, 3, H, W], got shape {tuple(images.shape)}")
        return images
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    return images if hasattr(images, "__getitem__") and hasattr(images, "__len__") else list(images)


def pixel_batches(images, preprocess, batch_size: int = 64) -> Iterator[torch.Tensor]:
    """Batches of model-ready pixels from a [B, 3, H, W] tensor (already preprocessed) or a sequence of
    PIL images / image paths (run through ``preprocess``)."""
    items = image_sequence(images)
    if isinstance(items, torch.Tensor):
        for start in range(0, len(items), batch_size):
            yield items[start:start + batch_size]
        return
    if preprocess is None:
        raise ValueError("PIL images or paths need the model's preprocess (pass a ClipBundle)")
    for start in range(0, len(items), batch_size):
        yield torch.stack([preprocess(open_image(x)) for x in items[start:start + batch_size]])


class CatalogueImages:
    """View ``view`` of every product of a catalogue as a lazy sequence of PIL images."""

    def __init__(self, catalogue, view: int = 0):
        self.catalogue, self.view = catalogue, view

    def __len__(self) -> int:
        return len(self.catalogue)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.catalogue.load_image(index, min(self.view, self.catalogue.num_views(index) - 1))
