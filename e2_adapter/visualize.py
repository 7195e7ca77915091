"""Where do the selection tokens look? Selection maps, drawings, figures and hit rates.

Usable from a notebook::

    from e2_adapter.visualize import selection_maps, draw_selections, save_selection_figure, selection_hit_rate

    maps = selection_maps(model, images)                   # per image: {entity: counts [F, grid, grid]}
    draw_selections(images[0], maps[0])                    # PIL image, picked patches tinted per entity
    save_selection_figure(model, images, "sel.png", baseline=clip_model)   # + CLIP's CLS attention
    selection_hit_rate(model, images, boxes, image_size=256)  # {entity: {0: .., 1: .., "chance": ..}}

Fusion blocks are numbered 0..F-1 in the order they run; ``get_adapter(model).fusion_after[f]`` is
the (1-based) tower block after which fusion block ``f`` runs. Everything here runs the model in
eval mode (deterministic argmax picks, no patch dropout) under ``torch.inference_mode`` and restores
each module's train/eval flag afterwards.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from .backends import unwrap_peft
from .backends.base import CLIP_MEAN, CLIP_STD
from .torch_utils import eval_mode, model_device
from .wrap import encode_image_regions, get_adapter, get_backend, is_wrapped


# Distinct, colour-blind-friendly-ish colours (Okabe-Ito first), one per entity in config order.
DEFAULT_COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (204, 121, 167), (213, 94, 0),
                   (0, 114, 178), (240, 228, 66), (120, 120, 120))

SelectionMap = dict[str, np.ndarray]          # entity -> int counts [F, grid, grid]
Box = tuple[float, float, float, float]       # x0, y0, x1, y1 in pixels, x1/y1 exclusive
ImageLike = Union[Image.Image, torch.Tensor, np.ndarray]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _as_batch(images, preprocess: Optional[Callable] = None) -> torch.Tensor:
    """A [B, 3, H, W] tensor from a tensor, a list of CHW tensors, or PIL images with ``preprocess``."""
    if torch.is_tensor(images):
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4:
            raise ValueError(f"images must be [B, 3, H, W] (or one [3, H, W]), got shape {tuple(images.shape)}")
        return images
    items = list(images)
    if not items:
        raise ValueError("no images given")
    out = []
    for im in items:
        if isinstance(im, Image.Image):
            if preprocess is None:
                raise ValueError("PIL images need preprocess= (the model's image transform) to become tensors")
            im = preprocess(im)
        if not torch.is_tensor(im) or im.dim() != 3:
            raise ValueError("each image must be a [3, H, W] tensor (or a PIL image with preprocess=)")
        out.append(im)
    return torch.stack(out)


def _grid_of(num_patches: int) -> int:
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid; selection maps need square images")
    return grid


def patch_grid(model: nn.Module, images: torch.Tensor) -> int:
    """Side of the patch grid the (wrapped or not) model sees for ``images`` ([B, 3, H, W])."""
    backend = get_backend(model)
    with torch.inference_mode(), eval_mode(unwrap_peft(model)):
        tokens = backend.embed(images[:1].to(model_device(model)))
    return _grid_of(tokens.shape[1] - 1)


def _size_wh(image_size) -> tuple[float, float]:
    if isinstance(image_size, (int, float)):
        return float(image_size), float(image_size)
    w, h = image_size
    return float(w), float(h)


# ---------------------------------------------------------------------------------------------
# selection maps
# ---------------------------------------------------------------------------------------------
def maps_from_selections(selections: torch.Tensor, entities: Sequence[str], tokens_per_entity: int,
                         grid: int) -> list[SelectionMap]:
    """``selections`` [B, F, S] (entity-major tokens) -> per image {entity: counts [F, grid, grid]}."""
    sel = torch.as_tensor(selections).detach().long().cpu().numpy()
    batch, fusions, num_tokens = sel.shape
    if num_tokens != len(entities) * tokens_per_entity:
        raise ValueError(f"selections have {num_tokens} tokens, expected {len(entities)} entities x "
                         f"{tokens_per_entity} tokens")
    if sel.size and (sel.min() < 0 or sel.max() >= grid * grid):
        raise ValueError(f"selection indices must lie in 0..{grid * grid - 1} for a {grid}x{grid} grid")
    out = []
    for b in range(batch):
        maps = {}
        for i, entity in enumerate(entities):
            counts = np.zeros((fusions, grid * grid), dtype=np.int64)
            for f in range(fusions):
                np.add.at(counts[f], sel[b, f, i * tokens_per_entity:(i + 1) * tokens_per_entity], 1)
            maps[entity] = counts.reshape(fusions, grid, grid)
        out.append(maps)
    return out


def selection_maps(model: nn.Module, images, *, batch_size: int = 64,
                   preprocess: Optional[Callable] = None) -> list[SelectionMap]:
    """Which patches each entity's selection tokens picked, per fusion block.

    ``images``: a normalised [B, 3, H, W] tensor (or a list of CHW tensors, or PIL images with
    ``preprocess``). Returns one dict per image, ``{entity: np.ndarray [F, grid, grid]}`` of pick
    counts: each slice ``[f]`` sums to ``tokens_per_entity``.
    """
    adapter = get_adapter(model)  # raises NotWrappedError with a clear message
    config = adapter.config
    batch = _as_batch(images, preprocess)
    grid = patch_grid(model, batch)
    device = model_device(model)
    out: list[SelectionMap] = []
    with torch.inference_mode(), eval_mode(unwrap_peft(model)):
        for start in range(0, batch.shape[0], batch_size):
            chunk = batch[start:start + batch_size].to(device)
            result = encode_image_regions(model, chunk)
            out.extend(maps_from_selections(result.selections, config.entities, config.tokens_per_entity, grid))
    return out


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def denormalize(image: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Image.Image:
    """A CHW tensor normalised with ``mean``/``std`` back to an RGB PIL image."""
    t = image.detach().float().cpu()
    if t.dim() != 3 or t.shape[0] not in (1, 3):
        raise ValueError(f"expected a [3, H, W] tensor, got shape {tuple(t.shape)}")
    t = t * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    arr = (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return Image.fromarray(arr, "RGB")


def to_pil(image: ImageLike, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> Image.Image:
    """PIL as is; a CHW tensor is denormalised with ``mean``/``std`` (pass mean=(0,0,0), std=(1,1,1)
    for a plain [0, 1] tensor); an HWC uint8 array is taken as RGB."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if torch.is_tensor(image):
        return denormalize(image, mean, std)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return Image.fromarray(arr.astype(np.uint8), "RGB")
    raise ValueError(f"cannot make an image of {type(image).__name__} with shape {getattr(arr, 'shape', None)}")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def entity_colours(entities: Sequence[str], colours=None) -> dict[str, tuple[int, int, int]]:
    """Entity -> RGB: ``colours`` may be a mapping (missing entities get defaults), a sequence
    (cycled in entity order) or None (``DEFAULT_COLOURS``)."""
    if isinstance(colours, Mapping):
        return {e: tuple(int(v) for v in colours.get(e, DEFAULT_COLOURS[i % len(DEFAULT_COLOURS)]))[:3]
                for i, e in enumerate(entities)}
    seq = list(colours) if colours is not None else list(DEFAULT_COLOURS)
    return {e: tuple(int(v) for v in seq[i % len(seq)])[:3] for i, e in enumerate(entities)}


def _select_fusions(counts: np.ndarray, fusion) -> np.ndarray:
    """Sum over the chosen fusion blocks: None = all, an int, or a sequence of ints."""
    if fusion is None:
        return counts.sum(0)
    idx = [fusion] if isinstance(fusion, int) else list(fusion)
    return counts[idx].sum(0)


def draw_selections(image: ImageLike, maps: SelectionMap, grid: Optional[int] = None, *,
                    entities: Optional[Sequence[str]] = None,
                    colours: Optional[Union[Mapping[str, tuple], Sequence[tuple]]] = None,
                    fusion: Union[None, int, Sequence[int]] = None, size: Optional[int] = None,
                    alpha: float = 0.35, legend: bool = True, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> Image.Image:
    """The image with each entity's picked patches tinted and outlined in the entity's colour.

    image: PIL, a CHW tensor normalised with ``mean``/``std`` (denormalised here), or HWC uint8.
    maps: one image's ``{entity: counts [F, grid, grid]}`` from ``selection_maps``.
    grid: patches per side (default: read from the maps).
    fusion: which fusion blocks to show (None = all, summed; an index; or a list).
    size: the side the image is drawn at (default: the image's width, at least 224, so that the
        tiny models' 32 px images stay readable). A patch picked several times shows its count.

    Returns an RGB image ``size`` wide and ``size * H / W`` high (``size`` x ``size`` for square
    images) plus, with ``legend=True``, a white legend strip below it (one swatch per entity).
    """
    pil = to_pil(image, mean, std)
    entities = list(entities) if entities is not None else list(maps)
    unknown = [e for e in entities if e not in maps]
    if unknown:
        raise ValueError(f"entities {unknown} are not in the maps (which have {list(maps)})")
    if grid is None:
        shapes = {maps[e].shape[-1] for e in entities} or {1}
        grid = shapes.pop()
    palette = entity_colours(entities, colours)

    width = size or max(pil.width, 224)
    height = round(width * pil.height / pil.width)
    base = pil.resize((width, height), Image.NEAREST if pil.width < width else Image.BILINEAR)
    cell_w, cell_h = width / grid, height / grid
    line = max(1, round(min(cell_w, cell_h) / 14))

    tint = Image.new("RGBA", base.size, (0, 0, 0, 0))
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    tint_draw, outline = ImageDraw.Draw(tint), ImageDraw.Draw(overlay)
    font = _font(max(9, round(min(cell_w, cell_h) / 3)))
    for k, entity in enumerate(entities):
        counts = _select_fusions(np.asarray(maps[entity]), fusion)
        colour = palette[entity]
        inset = k * line  # nested outlines when several entities pick the same patch
        for r, c in zip(*np.nonzero(counts)):
            x0, y0 = c * cell_w, r * cell_h
            x1, y1 = x0 + cell_w - 1, y0 + cell_h - 1
            tint_draw.rectangle([x0, y0, x1, y1], fill=colour + (round(255 * alpha),))
            outline.rectangle([x0 + inset, y0 + inset, x1 - inset, y1 - inset], outline=colour + (255,), width=line)
            if counts[r, c] > 1:
                outline.text((x0 + inset + 2 * line, y0 + inset + line), str(int(counts[r, c])),
                             fill=colour + (255,), font=font)
    drawn = Image.alpha_composite(Image.alpha_composite(base.convert("RGBA"), tint), overlay).convert("RGB")
    if not legend:
        return drawn

    font = _font(12)
    row_h, pad = 18, 4
    per_row = max(1, width // 110)
    rows = math.ceil(len(entities) / per_row)
    canvas = Image.new("RGB", (width, height + rows * row_h + pad), (255, 255, 255))
    canvas.paste(drawn, (0, 0))
    draw = ImageDraw.Draw(canvas)
    col_w = width / per_row
    for k, entity in enumerate(entities):
        r, c = divmod(k, per_row)
        x, y = round(c * col_w) + pad, height + pad + r * row_h
        draw.rectangle([x, y + 2, x + 11, y + 13], fill=palette[entity], outline=(0, 0, 0))
        draw.text((x + 15, y + 1), entity, fill=(0, 0, 0), font=font)
    return canvas


# ---------------------------------------------------------------------------------------------
# the baseline's attention
# ---------------------------------------------------------------------------------------------
def cls_attention(model: nn.Module, images: torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
    """CLS-to-patch attention of the last block of an *unwrapped* CLIP, averaged over heads:
    ``np.ndarray [B, grid, grid]`` (each map sums to the CLS row's patch share, below 1). How the
    weights are read is the family backend's ``cls_attention``."""
    model = unwrap_peft(model)
    if is_wrapped(model):
        raise ValueError("cls_attention needs an unwrapped CLIP (the baseline): in a wrapped model the last "
                         "block no longer sees the patches")
    batch = _as_batch(images)
    device = model_device(model)
    backend = get_backend(model)
    with torch.inference_mode(), eval_mode(model):
        maps = [backend.cls_attention(batch[start:start + batch_size].to(device)).cpu()
                for start in range(0, batch.shape[0], batch_size)]
    patches = torch.cat(maps)
    grid = _grid_of(patches.shape[1])
    return patches.reshape(-1, grid, grid).numpy()


# ---------------------------------------------------------------------------------------------
# figure
# ---------------------------------------------------------------------------------------------
def save_selection_figure(model: nn.Module, images, path, baseline: Optional[nn.Module] = None, *,
                          per_fusion: bool = False, titles: Optional[Sequence[str]] = None,
                          boxes: Optional[Sequence[Optional[Mapping[str, Box]]]] = None, box_frame=None,
                          colours=None, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                          cell_inches: float = 3.0, dpi: int = 100):
    """Save a PNG grid: one row per image; a column with the image and its selections (all fusion
    blocks together, or one column per fusion block with ``per_fusion=True``); and with ``baseline``
    (an unwrapped open_clip / OpenAI / transformers CLIP taking the same inputs) a column with its
    last block's CLS-to-patch attention as a heatmap over the image. Returns the path.

    ``boxes``: per image, the entities' true regions ({entity: (x0, y0, x1, y1)} in pixels of a frame
    of ``box_frame`` = side or (width, height), default the input's size; FashionSynth's ``regions``),
    drawn as dashed outlines in the entity's colour, so a reader sees whether the picks land on them.

    ``images``: the normalised [B, 3, H, W] model input (denormalised with ``mean``/``std`` for display).
    Uses matplotlib's object API (no pyplot), so it changes no global backend or figure state.
    """
    from pathlib import Path
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    batch = _as_batch(images)
    if boxes is not None and len(boxes) != batch.shape[0]:
        raise ValueError(f"{batch.shape[0]} images but {len(boxes)} box dicts: give one per image (None to skip)")
    config = get_adapter(model).config
    fusion_after = get_adapter(model).fusion_after
    if not fusion_after:
        raise ValueError("this adapter has no fusion blocks (fusion_after is empty), so its tokens pick no "
                         "patches and there are no selections to draw")
    maps = selection_maps(model, batch)
    grid = maps[0][config.entities[0]].shape[-1]
    heat = cls_attention(baseline, batch) if baseline is not None else None

    fusions = [[f] for f in range(len(fusion_after))] if per_fusion else [None]
    columns = len(fusions) + (heat is not None)
    rows = batch.shape[0]
    fig = Figure(figsize=(cell_inches * columns, cell_inches * rows + 0.6), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, columns, squeeze=False))
    palette = entity_colours(config.entities, colours)
    for b in range(rows):
        pil = to_pil(batch[b], mean, std)
        for j, fusion in enumerate(fusions):
            drawn = draw_selections(pil, maps[b], grid, colours=palette, fusion=fusion,
                                    legend=False, size=max(224, pil.width))
            ax = axes[b, j]
            ax.imshow(drawn)
            if boxes is not None and boxes[b]:
                _outline_boxes(ax, boxes[b], palette, box_frame or (pil.width, pil.height), drawn.size)
            label = ("selections (all fusion blocks)" if fusion is None
                     else f"fusion {fusion[0]} (after block {fusion_after[fusion[0]]})")
            ax.set_title(label if b == 0 else "", fontsize=9)
            if j == 0 and titles is not None:
                ax.set_ylabel(str(titles[b]), fontsize=9)
        if heat is not None:
            ax = axes[b, -1]
            w, h = pil.size
            ax.imshow(pil)
            ax.imshow(heat[b], cmap="inferno", alpha=0.55, extent=(0, w, h, 0), interpolation="nearest")
            ax.set_title("baseline CLS attention (last block)" if b == 0 else "", fontsize=9)
        for ax in axes[b]:
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [Patch(facecolor=np.array(palette[e]) / 255, edgecolor="black", label=e) for e in config.entities]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (cell_inches * rows + 0.6), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _outline_boxes(ax, boxes: Mapping[str, Box], palette, frame, drawn_size) -> None:
    from matplotlib.patches import Rectangle
    fw, fh = _size_wh(frame)
    sx, sy = drawn_size[0] / fw, drawn_size[1] / fh
    for entity, (x0, y0, x1, y1) in boxes.items():
        if entity in palette and x1 > x0 and y1 > y0:
            ax.add_patch(Rectangle((x0 * sx, y0 * sy), (x1 - x0) * sx, (y1 - y0) * sy, fill=False,
                                   edgecolor=np.array(palette[entity]) / 255, linestyle="--", linewidth=1.5))


# ---------------------------------------------------------------------------------------------
# hit rate
# ---------------------------------------------------------------------------------------------
def patch_box_overlap(box: Box, grid: int, image_size, min_overlap: float = 0.0) -> np.ndarray:
    """Boolean [grid, grid]: which patches overlap ``box`` (x0, y0, x1, y1 in pixels of an image of
    ``image_size`` = side or (width, height), x1/y1 exclusive) by more than ``min_overlap`` of the
    patch's area (0 = any overlap at all)."""
    width, height = _size_wh(image_size)
    x0, y0, x1, y1 = (float(v) for v in box)
    edges_x = np.arange(grid + 1) * width / grid
    edges_y = np.arange(grid + 1) * height / grid
    ox = np.clip(np.minimum(edges_x[1:], x1) - np.maximum(edges_x[:-1], x0), 0, None)  # [grid] columns
    oy = np.clip(np.minimum(edges_y[1:], y1) - np.maximum(edges_y[:-1], y0), 0, None)  # [grid] rows
    area = oy[:, None] * ox[None, :]
    cell = (width / grid) * (height / grid)
    return area > min_overlap * cell if min_overlap > 0 else area > 0


def hit_rate_from_maps(maps: Sequence[SelectionMap], boxes: Sequence[Optional[Mapping[str, Box]]], image_size,
                       min_overlap: float = 0.0) -> dict[str, dict]:
    """``selection_hit_rate`` on maps already computed (see there)."""
    if len(maps) != len(boxes):
        raise ValueError(f"{len(maps)} selection maps but {len(boxes)} box dicts: give one per image")
    hits: dict[str, np.ndarray] = {}
    picks: dict[str, np.ndarray] = {}
    chance: dict[str, list[float]] = {}
    entities: list[str] = []
    for image_maps, image_boxes in zip(maps, boxes):
        for entity, counts in image_maps.items():
            if entity not in entities:
                entities.append(entity)
            box = (image_boxes or {}).get(entity)
            if box is None or not (box[2] > box[0] and box[3] > box[1]):
                continue  # no (or an empty) box for this entity in this image
            counts = np.asarray(counts)
            inside = patch_box_overlap(box, counts.shape[-1], image_size, min_overlap)
            hits[entity] = hits.get(entity, 0) + (counts * inside).sum(axis=(1, 2))
            picks[entity] = picks.get(entity, 0) + counts.sum(axis=(1, 2))
            chance.setdefault(entity, []).append(float(inside.mean()))
    result: dict[str, dict] = {}
    for entity in entities:
        if entity not in picks:
            num_fusions = np.asarray(maps[0][entity]).shape[0]
            result[entity] = {f: float("nan") for f in range(num_fusions)}
            result[entity]["chance"] = float("nan")
            continue
        rates = hits[entity] / np.maximum(picks[entity], 1)
        result[entity] = {f: float(r) for f, r in enumerate(rates)}
        result[entity]["chance"] = float(np.mean(chance[entity]))
    return result


def selection_hit_rate(model: nn.Module, images, boxes: Sequence[Optional[Mapping[str, Box]]], image_size, *,
                       min_overlap: float = 0.0, batch_size: int = 64,
                       preprocess: Optional[Callable] = None) -> dict[str, dict]:
    """Do each entity's picks land on its region? ``{entity: {0: rate, 1: rate, ..., "chance": c}}``.

    ``boxes[i]``: image i's ``{entity: (x0, y0, x1, y1)}`` in pixels of an image of ``image_size``
    (side, or (width, height); the size the boxes were drawn at, e.g. FashionSynth's stored 256 even
    when the model sees 224: the patch grid is laid over that frame), x1/y1 exclusive, as FashionSynth
    stores them and ``FashionGenH5.regions(p, view)`` returns them; None or a missing entity skips it.

    rate[f] = share of the entity's picks in fusion block f on a patch overlapping its box (more than
    ``min_overlap`` of the patch's area; 0 = any overlap). ``chance`` = the mean share of patches that
    overlap the box: the rate of picks drawn uniformly at random. Entities without any box give NaN.
    """
    maps = selection_maps(model, images, batch_size=batch_size, preprocess=preprocess)
    return hit_rate_from_maps(maps, boxes, image_size, min_overlap)


__all__ = ["CLIP_MEAN", "CLIP_STD", "DEFAULT_COLOURS", "selection_maps", "maps_from_selections", "patch_grid",
           "denormalize", "to_pil", "entity_colours", "draw_selections", "cls_attention", "save_selection_figure",
           "patch_box_overlap", "hit_rate_from_maps", "selection_hit_rate"]
