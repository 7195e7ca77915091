"""The modality gap: how far a CLIP's image embeddings sit from its text embeddings, on average.

A text-only captioner (CapDec, DeCap) learns from text embeddings and is fed image embeddings, which
lie in another region of the sphere (Liang et al. 2022). Moving every image embedding by the mean
difference, ``normalise(image - (mean image - mean text))``, puts it where the captioner was trained.
The two means need images and texts of the domain, not pairs of them, so the correction stays
zero-shot. On FashionSynth it is what lets a finer encoder's reading reach the captions
(README, "Caption controls"); it is CapDec's ``--add_modality_offset`` applied at inference.

The gap is stored beside a saved captioner (``modality_gap.safetensors``) by ``caption train
--remove-gap`` and applied by ``caption generate`` when present.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from e2_adapter.files import atomic_write

GAP_FILE = "modality_gap.safetensors"


def modality_gap(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """[D]: mean normalised image embedding minus mean normalised text embedding (unpaired sets)."""
    if image_embeddings.ndim != 2 or text_embeddings.ndim != 2:
        raise ValueError(f"expected [N, D] embeddings, got images {tuple(image_embeddings.shape)} "
                         f"and texts {tuple(text_embeddings.shape)}")
    if image_embeddings.shape[1] != text_embeddings.shape[1]:
        raise ValueError(f"image and text embeddings differ in width ({image_embeddings.shape[1]} vs "
                         f"{text_embeddings.shape[1]}): embed both with the same encoder")
    if len(image_embeddings) == 0 or len(text_embeddings) == 0:
        raise ValueError("the modality gap needs at least one image and one text embedding")
    images = F.normalize(image_embeddings.float(), dim=-1)
    texts = F.normalize(text_embeddings.float(), dim=-1)
    return images.mean(dim=0) - texts.mean(dim=0)


def remove_gap(image_embeddings: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """Image embeddings moved by ``-gap`` and normalised again: where the text-trained decoder looks."""
    if gap.shape != image_embeddings.shape[-1:]:
        raise ValueError(f"the modality gap has shape {tuple(gap.shape)}, the embeddings width "
                         f"{image_embeddings.shape[-1]}: was it measured with another encoder?")
    moved = F.normalize(image_embeddings.float(), dim=-1) - gap.to(image_embeddings.device, torch.float32)
    return F.normalize(moved, dim=-1)


def save_gap(directory: str | Path, gap: torch.Tensor) -> Path:
    path = Path(directory) / GAP_FILE
    atomic_write(path, lambda tmp: save_file({"gap": gap.detach().float().cpu().contiguous()}, tmp))
    return path


def load_gap(directory: str | Path) -> torch.Tensor | None:
    """The gap saved beside a captioner, or None when it was trained without ``--remove-gap``."""
    path = Path(directory) / GAP_FILE
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    if set(tensors) != {"gap"} or tensors["gap"].ndim != 1:
        raise ValueError(f"{path} is not a modality gap (expected one 1-D tensor named 'gap', "
                         f"found {sorted(tensors)}); delete it or retrain with --remove-gap")
    return tensors["gap"]
