"""FashionSynth: a procedurally drawn stand-in for FashionGen, in FashionGen's exact h5 schema.

FashionGen may not be redistributed, so tests, examples and benchmarks need a
dataset anyone can make in seconds. FashionSynth is built to exercise what E2 is
about: its tag entities live in image regions of very different size.

- sub-category: the garment silhouette (large)
- colour:       the garment colour (large; only in the name / description)
- composition:  a fabric texture on a panel of the garment (medium)
- brand:        a tiny logo plate, a 4 x 4 glyph in the brand's colour, at one of
                a few places on the garment (small)
- season:       a tiny label whose dots code the year and whose colour codes SS/FW (small)

Many products share silhouette and colour and differ only in the small details,
so global features alone cannot tell them apart. Views of one product differ by
a small shift, scale and brightness change. Ground-truth entity boxes are
stored in extra keys ``region_<entity>`` (int16, N x 4, x0 y0 x1 y1 exclusive).

How things look (glyphs, textures, silhouettes) depends only on the vocabulary
sizes, never on ``seed``: train and validation files share one visual world,
and the seed only draws which products exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np

from ..config import DEFAULT_ENTITIES

TRAIN_FILE = "fashionsynth_train.h5"
VALIDATION_FILE = "fashionsynth_validation.h5"
SYNTH_ENTITIES = DEFAULT_ENTITIES  # the paper's four entities are FashionGen's tags

_WORLD_SEED = 20241210  # fixes the look of the world (glyphs); independent of the sample seed
_BACKGROUND = np.array([248.0, 248.0, 246.0])
_RENDER_CHUNK = 256  # images rendered and written per h5 write
# FashionGen string keys written from each product's texts (input_pose is per view).
_STRING_FIELDS = ("brand", "category", "composition", "concat_description", "department",
                  "description", "gender", "name", "season", "subcategory")

# -- vocabularies --------------------------------------------------------------

# Invented brand names (no real brands).
_BRAND_NAMES = (
    "Maison Orlo", "Vetrano", "Kessel & Rhee", "Alder Studio", "Noor Atelier", "Brisk Row",
    "Calder Vane", "Oda Marin", "Fenwick Hall", "Lune Paris", "Tamsin Grey", "Ostra",
    "Hollis Kade", "Ivo Brant", "Seren Lake", "Mabel & Co", "Quill North", "Ravel Ames",
    "Sable Works", "Tove Lind", "Umber House", "Varga Nord", "Wren Oakes", "Yuki Sato",
    "Zephyr Mill", "Arlo Vance", "Bastien Roux", "Corin Hale", "Delphine Ost", "Elm & Ash",
)

_COLOURS = {  # name -> RGB
    "black": (25, 25, 28), "white": (236, 234, 228), "navy": (32, 42, 84),
    "grey": (128, 128, 132), "red": (182, 32, 38), "beige": (206, 186, 150),
    "olive": (100, 110, 52), "burgundy": (112, 26, 46), "blue": (62, 112, 192),
    "brown": (112, 72, 42),
}

# composition string -> (fabric word for texts, texture name)
_COMPOSITIONS = {
    "100% cotton": ("cotton", "stripes_h"),
    "100% wool": ("wool", "chevron"),
    "100% polyester": ("technical", "sheen"),
    "100% linen": ("linen", "slub"),
    "96% cotton, 4% polyurethane": ("stretch cotton", "twill"),
    "100% silk": ("silk", "wide_stripes"),
    "100% lambskin": ("leather", "dots"),
    "70% wool, 30% polyamide": ("wool-blend", "herringbone"),
    "100% nylon": ("nylon", "ripstop"),
    "55% linen, 45% cotton": ("linen-blend", "stripes_v"),
    "80% viscose, 20% elastane": ("jersey", "antitwill"),
    "100% cashmere": ("cashmere", "check"),
}

_LOGO_COLOURS = ((205, 30, 30), (30, 95, 210), (20, 150, 60), (235, 165, 0),
                 (150, 40, 175), (0, 160, 170))
_SS_COLOUR, _FW_COLOUR = (235, 175, 20), (125, 40, 165)


# -- silhouettes -----------------------------------------------------------------
# Garment coordinates: u to the right, v downwards, the garment fills about [-1, 1]^2.
Poly = tuple[tuple[float, float], ...]


def _rect(u0: float, v0: float, u1: float, v1: float) -> Poly:
    return ((u0, v0), (u1, v0), (u1, v1), (u0, v1))


def _mirror(poly: Poly) -> Poly:
    return tuple((-u, v) for u, v in poly)


def _pair(poly: Poly) -> tuple[Poly, Poly]:
    return poly, _mirror(poly)


@dataclass(frozen=True)
class _Silhouette:
    noun: str
    category: str                      # FashionGen's coarser input_category
    genders: tuple[str, ...]
    leads: tuple[str, ...]             # first words of the description
    details: tuple[str, ...]           # construction sentences for the description
    parts: tuple[Poly, ...]            # convex polygons whose union is the garment
    cuts: tuple[Poly, ...] = ()        # convex polygons removed (neck openings)
    trims: tuple[tuple[Poly, float], ...] = ()  # (polygon, shade) drawn over the garment
    panel: tuple[float, float, float, float] = (-0.38, -0.3, 0.38, 0.45)  # textured area
    logo_spots: tuple[tuple[str, float, float], ...] = (
        ("at left chest", -0.28, -0.5), ("at right chest", 0.28, -0.5), ("at hem", -0.28, 0.68))
    label_spot: tuple[float, float] = (0.3, 0.7)


_TORSO = _rect(-0.5, -0.75, 0.5, 0.9)
_LONG_SLEEVES = _pair(((-0.5, -0.75), (-0.5, -0.35), (-0.8, 0.75), (-0.98, 0.7)))
_SHORT_SLEEVES = _pair(((-0.5, -0.75), (-0.5, -0.3), (-0.72, -0.15), (-0.92, -0.42)))
_CREW_NECK = ((-0.18, -0.76), (0.18, -0.76), (0.1, -0.6), (-0.1, -0.6))
_V_NECK = ((-0.18, -0.76), (0.18, -0.76), (0.0, -0.45))
_DEEP_V = ((-0.2, -0.76), (0.2, -0.76), (0.0, -0.2))
_HIPS = _rect(-0.5, -0.8, 0.5, -0.35)
_WAISTBAND = (_rect(-0.5, -0.8, 0.5, -0.68), 0.78)

_SILHOUETTES = {
    "SHIRTS": _Silhouette(
        "shirt", "SHIRTS", ("MEN", "WOMEN"), ("Long sleeve",),
        ("Spread collar", "Button closure at front", "Single-button barrel cuffs",
         "Curved hem", "Patch pocket at chest", "Tonal stitching"),
        (_TORSO, *_LONG_SLEEVES), (_V_NECK,),
        ((((-0.22, -0.77), (0.0, -0.52), (-0.26, -0.58)), 0.75),
         (((0.22, -0.77), (0.0, -0.52), (0.26, -0.58)), 0.75),
         (_rect(-0.03, -0.5, 0.03, 0.9), 0.8))),
    "T-SHIRTS": _Silhouette(
        "t-shirt", "TOPS", ("MEN", "WOMEN"), ("Short sleeve",),
        ("Rib knit crewneck collar", "Tonal stitching", "Straight hem",
         "Dropped shoulders", "Relaxed fit"),
        (_TORSO, *_SHORT_SLEEVES), (_CREW_NECK,)),
    "SWEATERS": _Silhouette(
        "sweater", "SWEATERS", ("MEN", "WOMEN"), ("Long sleeve", "Knit"),
        ("Rib knit crewneck collar, cuffs, and hem", "Dropped shoulders", "Tonal stitching"),
        (_rect(-0.52, -0.72, 0.52, 0.9), *_LONG_SLEEVES), (_CREW_NECK,),
        ((_rect(-0.52, 0.78, 0.52, 0.9), 0.78),)),
    "JACKETS": _Silhouette(
        "jacket", "JACKETS & COATS", ("MEN", "WOMEN"), ("Long sleeve",),
        ("Notched lapel collar", "Button closure at front", "Flap pockets at waist",
         "Welt pocket at chest", "Central vent at back hem", "Fully lined"),
        (_TORSO, *_LONG_SLEEVES), (_DEEP_V,),
        ((((-0.2, -0.76), (-0.02, -0.2), (-0.3, -0.45)), 0.7),
         (((0.2, -0.76), (0.02, -0.2), (0.3, -0.45)), 0.7),
         (_rect(-0.02, -0.2, 0.02, 0.9), 0.5))),
    "DRESSES": _Silhouette(
        "dress", "DRESSES", ("WOMEN",), ("Sleeveless", "Midi"),
        ("Scoopneck collar", "Concealed zip closure at back", "Flared skirt",
         "Darts at bust", "Partially lined"),
        (((-0.35, -0.72), (0.35, -0.72), (0.3, -0.1), (-0.3, -0.1)),
         ((-0.3, -0.1), (0.3, -0.1), (0.75, 0.95), (-0.75, 0.95)),
         *_pair(_rect(-0.32, -0.95, -0.2, -0.71))),
        (((-0.16, -0.73), (0.16, -0.73), (0.08, -0.6), (-0.08, -0.6)),),
        ((_rect(-0.3, -0.14, 0.3, -0.08), 0.75),),
        panel=(-0.34, 0.1, 0.34, 0.6),
        logo_spots=(("at bodice", -0.17, -0.42), ("at bodice", 0.17, -0.42), ("at hem", -0.4, 0.8)),
        label_spot=(0.4, 0.8)),
    "SKIRTS": _Silhouette(
        "skirt", "SKIRTS", ("WOMEN",), ("Knee-length", "A-line"),
        ("Concealed zip closure at side", "Darts at waist", "Unlined", "Box pleats at front"),
        (((-0.45, -0.75), (0.45, -0.75), (0.8, 0.85), (-0.8, 0.85)),), (),
        ((_rect(-0.45, -0.75, 0.45, -0.63), 0.78),),
        panel=(-0.4, -0.3, 0.4, 0.4),
        logo_spots=(("at waist", -0.25, -0.46), ("at waist", 0.25, -0.46), ("at hem", -0.4, 0.65)),
        label_spot=(0.4, 0.65)),
    "PANTS": _Silhouette(
        "trousers", "PANTS", ("MEN", "WOMEN"), ("Straight-leg", "Slim-fit"),
        ("Four-pocket styling", "Belt loops at waistband", "Zip fly", "Creased legs",
         "Cuffed hem"),
        (_HIPS, ((-0.5, -0.35), (-0.02, -0.35), (-0.08, 0.95), (-0.46, 0.95)),
         ((0.5, -0.35), (0.02, -0.35), (0.08, 0.95), (0.46, 0.95))), (),
        (_WAISTBAND,),
        panel=(-0.44, -0.3, -0.08, 0.4),
        logo_spots=(("at hip", 0.25, -0.54), ("at knee", 0.27, 0.3), ("at hem", -0.27, 0.7)),
        label_spot=(0.27, 0.76)),
    "COATS": _Silhouette(
        "coat", "JACKETS & COATS", ("MEN", "WOMEN"), ("Long sleeve", "Double-breasted"),
        ("Notched lapel collar", "Self-tie belt at waist", "Welt pockets at waist",
         "Vent at back hem", "Fully lined"),
        (((-0.5, -0.75), (0.5, -0.75), (0.58, 0.98), (-0.58, 0.98)), *_LONG_SLEEVES), (_DEEP_V,),
        ((((-0.2, -0.76), (-0.02, -0.2), (-0.3, -0.45)), 0.7),
         (((0.2, -0.76), (0.02, -0.2), (0.3, -0.45)), 0.7),
         (_rect(-0.52, 0.06, 0.52, 0.14), 0.65)),
        logo_spots=(("at left chest", -0.28, -0.5), ("at right chest", 0.28, -0.5),
                    ("at hem", -0.3, 0.78)),
        label_spot=(0.32, 0.8)),
    "SHORTS": _Silhouette(
        "shorts", "SHORTS", ("MEN", "WOMEN"), ("Relaxed-fit", "Tailored"),
        ("Four-pocket styling", "Belt loops at waistband", "Zip fly", "Rolled cuffs"),
        (_HIPS, ((-0.5, -0.35), (-0.02, -0.35), (-0.05, 0.2), (-0.55, 0.2)),
         ((0.5, -0.35), (0.02, -0.35), (0.05, 0.2), (0.55, 0.2))), (),
        (_WAISTBAND,),
        panel=(-0.46, -0.3, -0.08, 0.16),
        logo_spots=(("at hip", 0.25, -0.54), ("at hip", -0.25, -0.54), ("at leg", 0.28, -0.16)),
        label_spot=(0.28, 0.1)),
    "TOPS": _Silhouette(
        "tank top", "TOPS", ("WOMEN", "MEN"), ("Sleeveless",),
        ("Scoopneck collar", "Rib knit trim", "Straight hem", "Tonal stitching"),
        (((-0.42, -0.6), (0.42, -0.6), (0.46, 0.9), (-0.46, 0.9)),
         *_pair(_rect(-0.36, -0.92, -0.22, -0.59))),
        (((-0.22, -0.61), (0.22, -0.61), (0.12, -0.42), (-0.12, -0.42)),),
        panel=(-0.36, -0.15, 0.36, 0.5),
        logo_spots=(("at chest", -0.27, -0.33), ("at chest", 0.27, -0.33), ("at hem", -0.28, 0.72)),
        label_spot=(0.3, 0.74)),
}


# -- textures (composition): pattern in [0, 1] over panel pixels, c = cell size ---------
def _texture(name: str, x: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    if name == "stripes_h":
        return (y // (2 * c)) % 2
    if name == "stripes_v":
        return (x // (2 * c)) % 2
    if name == "wide_stripes":
        return (y // (4 * c)) % 2
    if name == "twill":
        return ((x + y) // (2 * c)) % 2
    if name == "antitwill":
        return ((x - y) // (2 * c)) % 2
    if name == "dots":
        return (x % (3 * c) < c) & (y % (3 * c) < c)
    if name == "check":
        return ((x // (2 * c)) + (y // (2 * c))) % 2
    if name == "ripstop":
        return (x % (4 * c) < c) | (y % (4 * c) < c)
    if name == "chevron":  # knit: stacked Vs
        return ((y + np.abs(x % (4 * c) - 2 * c)) // (2 * c)) % 2
    if name == "herringbone":  # zigzag: twill direction flips every 3 cells
        flip = (x // (3 * c)) % 2 == 1
        return np.where(flip, (x + y) // (2 * c), (x - y) // (2 * c)) % 2
    if name == "slub":  # irregular horizontal lines
        return ((y // c) * 7 % 5 < 2) & ((x // (3 * c) + y // c) % 4 != 0)
    if name == "sheen":  # smooth fabric: a soft diagonal highlight, no repeat
        return (x + y) / max(1.0, float(x.max() + y.max()))
    raise KeyError(name)


# -- the world: vocabularies and their fixed appearance ------------------------------
@dataclass(frozen=True)
class SynthWorld:
    """Vocabularies and how each value looks; deterministic from the vocabulary sizes."""

    brands: tuple[str, ...]
    seasons: tuple[str, ...]
    subcategories: tuple[str, ...]
    compositions: tuple[str, ...]
    colours: tuple[str, ...]
    brand_glyphs: np.ndarray    # [B, 4, 4] bool
    brand_colours: np.ndarray   # [B, 3]
    logo_scale: int = 1         # brand plate side = 6 x logo_scale cells (glyph 4 x 4 of them)
    label_scale: int = 1        # season label = 7 x 3 cells of label_scale
    keep_apart: bool = False    # move the logo plate off the season label where they would overlap

    def vocabulary(self) -> dict[str, tuple[str, ...]]:
        return {"brand": self.brands, "season": self.seasons,
                "subcategory": self.subcategories, "composition": self.compositions}


def _check_count(name: str, n: int, available: int) -> None:
    if not 1 <= n <= available:
        raise ValueError(f"{name} must be between 1 and {available}, got {n}")


def make_world(brands: int = 24, subcategories: int = 8, seasons: int = 6,
               compositions: int = 10, colours: int = 8, logo_colours: int = len(_LOGO_COLOURS),
               logo_scale: int = 1, label_scale: int = 1, keep_apart: bool = False) -> SynthWorld:
    """Build the FashionSynth vocabularies (the first N of each built-in list).

    How hard the small details are is set here: ``logo_colours`` (brands share that many plate
    colours, so with fewer colours than brands only the glyph tells them apart), ``logo_scale`` and
    ``label_scale`` (the logo plate and the season label drawn that many times larger).
    ``keep_apart``: a large plate can cover the season label (at logo_scale 3 it often does, and the
    label becomes unreadable); this moves the plate above or below the label instead.
    """
    _check_count("subcategories", subcategories, len(_SILHOUETTES))
    _check_count("logo_colours", logo_colours, len(_LOGO_COLOURS))
    for name, value in (("logo_scale", logo_scale), ("label_scale", label_scale)):
        if not 1 <= value <= 4:
            raise ValueError(f"{name} must be between 1 and 4, got {value}")
    _check_count("compositions", compositions, len(_COMPOSITIONS))
    _check_count("colours", colours, len(_COLOURS))
    _check_count("seasons", seasons, 14)  # 3-bit year code x {SS, FW}
    if brands < 1:
        raise ValueError(f"brands must be >= 1, got {brands}")
    names = [_BRAND_NAMES[i] if i < len(_BRAND_NAMES) else f"Studio {i + 1:03d}"
             for i in range(brands)]
    season_names = [f"{'SS' if i % 2 == 0 else 'FW'}{2016 + i // 2}" for i in range(seasons)]

    # Unique (glyph, colour) per brand; drawn from a fixed stream so the look never moves.
    rng = np.random.default_rng(_WORLD_SEED)
    seen, glyphs, plate_colours = set(), [], []
    while len(glyphs) < brands:
        glyph = rng.random((4, 4)) < 0.5
        colour = int(rng.integers(logo_colours))
        key = (glyph.tobytes(), colour)
        if not 5 <= glyph.sum() <= 11 or key in seen:
            continue
        seen.add(key)
        glyphs.append(glyph)
        plate_colours.append(_LOGO_COLOURS[colour])
    return SynthWorld(
        brands=tuple(names), seasons=tuple(season_names),
        subcategories=tuple(list(_SILHOUETTES)[:subcategories]),
        compositions=tuple(list(_COMPOSITIONS)[:compositions]),
        colours=tuple(list(_COLOURS)[:colours]),
        brand_glyphs=np.stack(glyphs), brand_colours=np.array(plate_colours, dtype=np.float32),
        logo_scale=logo_scale, label_scale=label_scale, keep_apart=keep_apart)


# -- sampling products and views --------------------------------------------------------
@dataclass
class _Product:
    brand: int
    season: int
    subcategory: int
    composition: int
    colour: int
    logo_spot: int
    logo_jitter: tuple[float, float]
    scale: float
    texts: dict[str, str]       # FashionGen string fields (short names)
    price: float


@dataclass
class _View:
    dx: float
    dy: float
    scale: float
    brightness: float


def _sample_product(world: SynthWorld, rng: np.random.Generator) -> _Product:
    b, s, k, m, c = (int(rng.integers(len(v))) for v in (
        world.brands, world.seasons, world.subcategories, world.compositions, world.colours))
    sil = _SILHOUETTES[world.subcategories[k]]
    spot = int(rng.integers(len(sil.logo_spots)))
    jitter = (float(rng.uniform(-0.05, 0.05)), float(rng.uniform(-0.05, 0.05)))
    scale = float(rng.uniform(0.32, 0.37))
    colour = world.colours[c]
    fabric = _COMPOSITIONS[world.compositions[m]][0]
    lead = sil.leads[int(rng.integers(len(sil.leads)))]
    n_details = int(rng.integers(2, min(4, len(sil.details)) + 1))
    picked = sorted(rng.choice(len(sil.details), n_details, replace=False))
    details = [sil.details[i] for i in picked]
    description = " ".join(
        [f"{lead} {fabric} {sil.noun} in {colour}."] + [f"{d}." for d in details]
        + [f"Logo plaque {sil.logo_spots[spot][0]}."])
    name = f"{colour.capitalize()} {fabric.capitalize()} {sil.noun.capitalize()}"
    gender = sil.genders[int(rng.integers(len(sil.genders)))]
    texts = {
        "brand": world.brands[b], "season": world.seasons[s],
        "subcategory": world.subcategories[k], "composition": world.compositions[m],
        "category": sil.category, "department": "CLOTHING", "gender": gender,
        "name": name, "description": description,
        "concat_description": f"{name}. {description} {world.compositions[m]}.",
    }
    price = float(np.round(rng.uniform(80, 1800), 0))
    return _Product(b, s, k, m, c, spot, jitter, scale, texts, price)


def _sample_view(rng: np.random.Generator) -> _View:
    return _View(dx=float(rng.uniform(-0.03, 0.03)), dy=float(rng.uniform(-0.03, 0.03)),
                 scale=float(rng.uniform(0.95, 1.05)), brightness=float(rng.uniform(0.92, 1.06)))


# -- rendering ----------------------------------------------------------------------------
def _in_polygon(u: np.ndarray, v: np.ndarray, poly: Poly) -> np.ndarray:
    """Inside test for a convex polygon of either orientation (broadcasts u [1,W], v [H,1])."""
    pos = neg = None
    n = len(poly)
    for i in range(n):
        (u0, v0), (u1, v1) = poly[i], poly[(i + 1) % n]
        cross = (u1 - u0) * (v - v0) - (v1 - v0) * (u - u0)
        pos = (cross >= 0) if pos is None else pos & (cross >= 0)
        neg = (cross <= 0) if neg is None else neg & (cross <= 0)
    return pos | neg


def _contrast(rgb: np.ndarray) -> np.ndarray:
    """White on dark garments, near-black on light ones."""
    luminance = float(rgb @ np.array([0.299, 0.587, 0.114]))
    return np.array([250.0, 250.0, 250.0]) if luminance < 140 else np.array([28.0, 28.0, 28.0])


def _box(x0: float, y0: float, x1: float, y1: float, size: int) -> tuple[int, int, int, int]:
    def clip(t: float) -> int:
        return int(min(max(round(t), 0), size))
    return clip(x0), clip(y0), clip(x1), clip(y1)


def _render(world: SynthWorld, product: _Product, view: _View, size: int
            ) -> tuple[np.ndarray, dict[str, tuple[int, int, int, int]]]:
    """Draw one view; returns (uint8 H x W x 3, entity boxes)."""
    sil = _SILHOUETTES[world.subcategories[product.subcategory]]
    cell = max(1, size // 64)
    half = product.scale * view.scale * size          # pixels per garment unit
    cx, cy = size * (0.5 + view.dx), size * (0.5 + view.dy)

    def to_px(u: float, v: float) -> tuple[float, float]:
        return cx + u * half, cy + v * half

    coords = np.arange(size) + 0.5
    u = ((coords - cx) / half)[None, :]
    v = ((coords - cy) / half)[:, None]
    mask = np.zeros((size, size), dtype=bool)
    for poly in sil.parts:
        mask |= _in_polygon(u, v, poly)
    for poly in sil.cuts:
        mask &= ~_in_polygon(u, v, poly)

    img = np.broadcast_to(_BACKGROUND, (size, size, 3)).copy()
    base = np.array(_COLOURS[world.colours[product.colour]], dtype=np.float64)
    contrast = _contrast(base)
    # Soft top-to-bottom shading so the garment is not a flat sticker.
    shade = (1.0 - 0.08 * (np.clip(v, -1, 1) + 1) / 2)[:, :, None]
    img = np.where(mask[:, :, None], base * shade, img)

    # Composition: texture on the panel (medium region).
    pu0, pv0, pu1, pv1 = sil.panel
    panel_box = _box(*to_px(pu0, pv0), *to_px(pu1, pv1), size)
    x0, y0, x1, y1 = panel_box
    if x1 > x0 and y1 > y0:
        ys, xs = np.mgrid[0:y1 - y0, 0:x1 - x0]
        texture_name = _COMPOSITIONS[world.compositions[product.composition]][1]
        pattern = _texture(texture_name, xs, ys, cell).astype(np.float64)[:, :, None]
        region = img[y0:y1, x0:x1]
        textured = region * (1 - 0.5 * pattern) + contrast * 0.5 * pattern
        img[y0:y1, x0:x1] = np.where(mask[y0:y1, x0:x1, None], textured, region)

    # Trims (collars, plackets, bands) and a darker outline.
    for poly, factor in sil.trims:
        trim = _in_polygon(u, v, poly) & mask
        img[trim] *= factor
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    img[mask & ~inner] = base * 0.55

    # Brand: a 4 x 4 glyph in the brand colour on a contrasting plate (small region).
    _, lu, lv = sil.logo_spots[product.logo_spot]
    lx, ly = to_px(lu + product.logo_jitter[0], lv + product.logo_jitter[1])
    lc = cell * world.logo_scale
    plate = 6 * lc
    bx0, by0 = int(round(lx - plate / 2)), int(round(ly - plate / 2))
    sc = cell * world.label_scale
    tx, ty = to_px(*sil.label_spot)
    label_x0, label_y0 = int(round(tx - 3.5 * sc)), int(round(ty - 1.5 * sc))
    if world.keep_apart and _overlap((bx0, by0, bx0 + plate, by0 + plate),
                                     (label_x0, label_y0, label_x0 + 7 * sc, label_y0 + 3 * sc)):
        above = label_y0 - plate - 1
        by0 = above if above >= 0 else label_y0 + 3 * sc + 1
    glyph = np.kron(world.brand_glyphs[product.brand], np.ones((lc, lc), dtype=bool))
    logo = np.broadcast_to(contrast, (plate, plate, 3)).copy()
    logo[lc:5 * lc, lc:5 * lc][glyph] = world.brand_colours[product.brand]
    brand_box = _paste(img, logo, bx0, by0)

    # Season: a 7 x 3 label; lit dots code the year, their colour codes SS / FW (small).
    year, autumn = divmod(product.season, 2)
    bits = [(year + 1) >> i & 1 for i in (2, 1, 0)]
    label = np.broadcast_to(np.array([238.0, 230.0, 212.0]), (3 * sc, 7 * sc, 3)).copy()
    dot = np.array(_FW_COLOUR if autumn else _SS_COLOUR, dtype=np.float64)
    for i, bit in enumerate(bits):
        if bit:
            label[sc:2 * sc, (2 * i + 1) * sc:(2 * i + 2) * sc] = dot
    season_box = _paste(img, label, label_x0, label_y0)

    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    garment_box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)

    img = np.clip(img * view.brightness, 0, 255).round().astype(np.uint8)
    boxes = {"brand": brand_box, "season": season_box, "subcategory": garment_box,
             "composition": panel_box}
    return img, boxes


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _paste(img: np.ndarray, patch: np.ndarray, x0: int, y0: int) -> tuple[int, int, int, int]:
    """Paste ``patch`` with its top-left at (x0, y0), clipped to the image; returns its box."""
    h, w = patch.shape[:2]
    size_y, size_x = img.shape[:2]
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + w, size_x), min(y0 + h, size_y)
    if cx1 > cx0 and cy1 > cy0:
        img[cy0:cy1, cx0:cx1] = patch[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return cx0, cy0, max(cx1, cx0), max(cy1, cy0)


# -- writing ---------------------------------------------------------------------------------
def _string_column(values: Sequence[str]) -> np.ndarray:
    """FashionGen stores strings as fixed-length latin-1 bytes, shape (N, 1)."""
    encoded = [s.encode("latin-1") for s in values]
    width = max(1, max((len(b) for b in encoded), default=1))
    return np.array(encoded, dtype=f"S{width}").reshape(-1, 1)


def _write_split(path: Path, world: SynthWorld, n_products: int, rng: np.random.Generator,
                 first_product_id: int, image_size: int, views: tuple[int, int],
                 progress: Callable[[int, int], None] | None) -> None:
    products = [_sample_product(world, rng) for _ in range(n_products)]
    view_counts = rng.integers(views[0], views[1] + 1, size=n_products)
    view_params = [_sample_view(rng) for _ in range(int(view_counts.sum()))]
    owner = np.repeat(np.arange(n_products), view_counts)   # product of each row
    pose = np.concatenate([np.arange(1, k + 1) for k in view_counts])
    n = len(owner)

    # Never leave a half-written file under the real name.
    tmp = path.with_name(path.name + ".partial")
    with h5py.File(tmp, "w") as f:
        def put(key: str, data: np.ndarray) -> None:
            f.create_dataset(key, data=data, track_times=False)

        put("index", np.arange(n, dtype=np.int64).reshape(-1, 1))
        put("index_2", np.arange(n, dtype=np.int64).reshape(-1, 1))
        for field in _STRING_FIELDS:
            put(f"input_{field}", _string_column([products[o].texts[field] for o in owner]))
        put("input_pose", _string_column([f"id_gridfs_{k}" for k in pose]))
        put("input_msrpUSD", np.array([products[o].price for o in owner],
                                      dtype=np.float32).reshape(-1, 1))
        put("input_productID", (first_product_id + owner).astype(np.int64).reshape(-1, 1))
        images = f.create_dataset("input_image", shape=(n, image_size, image_size, 3),
                                  dtype=np.uint8, chunks=(1, image_size, image_size, 3),
                                  track_times=False)
        regions = {e: np.zeros((n, 4), dtype=np.int16) for e in SYNTH_ENTITIES}
        for start in range(0, n, _RENDER_CHUNK):
            stop = min(start + _RENDER_CHUNK, n)
            block = np.empty((stop - start, image_size, image_size, 3), dtype=np.uint8)
            for row in range(start, stop):
                block[row - start], boxes = _render(world, products[owner[row]],
                                                    view_params[row], image_size)
                for e in SYNTH_ENTITIES:
                    regions[e][row] = boxes[e]
            images[start:stop] = block
            if progress is not None:
                progress(stop, n)
        for e in SYNTH_ENTITIES:
            put(f"region_{e}", regions[e])
    os.replace(tmp, path)


def write_fashionsynth(out_dir: str | os.PathLike, products: int = 2000, val_products: int = 500,
                       seed: int = 0, image_size: int = 64, views: tuple[int, int] = (1, 3),
                       brands: int = 24, subcategories: int = 8, seasons: int = 6,
                       compositions: int = 10, colours: int = 8, logo_colours: int = len(_LOGO_COLOURS),
                       logo_scale: int = 1, label_scale: int = 1, keep_apart: bool = False,
                       progress: Callable[[int, int], None] | None = None) -> tuple[Path, Path]:
    """Write ``fashionsynth_train.h5`` and ``fashionsynth_validation.h5`` into ``out_dir``.

    Both files use FashionGen's 16 keys and dtypes (so ``FashionGenH5`` reads them
    unchanged) plus ``region_<entity>`` boxes. The same arguments always give the
    same bytes in every key. ``views`` is the (min, max) number of images per
    product; ``progress(done, total)`` is called after each written block of images.
    The world options (vocabulary sizes, ``logo_colours``, ``logo_scale``, ``label_scale``)
    are ``make_world``'s.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 (the logo is 6 px), got {image_size}")
    if products < 1 or val_products < 1:
        raise ValueError(f"products and val_products must be >= 1, got {products}, {val_products}")
    lo, hi = views
    if not 1 <= lo <= hi:
        raise ValueError(f"views must be (min, max) with 1 <= min <= max, got {views}")
    world = make_world(brands, subcategories, seasons, compositions, colours,
                       logo_colours=logo_colours, logo_scale=logo_scale, label_scale=label_scale,
                       keep_apart=keep_apart)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_path, val_path = out / TRAIN_FILE, out / VALIDATION_FILE
    # Independent streams per split: the validation set does not change with `products`.
    common = dict(world=world, image_size=image_size, views=(lo, hi), progress=progress)
    _write_split(train_path, n_products=products, rng=np.random.default_rng([seed, 0]),
                 first_product_id=1_000_000, **common)
    _write_split(val_path, n_products=val_products, rng=np.random.default_rng([seed, 1]),
                 first_product_id=9_000_000, **common)
    return train_path, val_path



@dataclass(frozen=True)
class SynthSpec:
    """Everything that decides a FashionSynth data set, as one record (flags, JSON, cache keys).

    ``write(out_dir)`` gives the same bytes for the same spec; benchmarks store the spec beside
    the files so a run can always be repeated from it.
    """

    products: int = 2000
    val_products: int = 500
    seed: int = 0
    image_size: int = 64
    views: tuple[int, int] = (1, 3)
    brands: int = 24
    seasons: int = 6
    subcategories: int = 8
    compositions: int = 10
    colours: int = 8
    logo_colours: int = len(_LOGO_COLOURS)
    logo_scale: int = 1
    label_scale: int = 1
    keep_apart: bool = False

    def write(self, out_dir: str | os.PathLike,
              progress: Callable[[int, int], None] | None = None) -> tuple[Path, Path]:
        options = {k: getattr(self, k) for k in self.__dataclass_fields__}
        options["views"] = tuple(options["views"])
        return write_fashionsynth(out_dir, progress=progress, **options)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in
                ((k, getattr(self, k)) for k in self.__dataclass_fields__)}


# flag name -> (field, help); the one list behind `e2-adapter synth` and the benchmarks' data flags
_SPEC_HELP = {
    "products": "training products",
    "val_products": "validation products",
    "seed": "data seed: which products exist (the look of the world never depends on it)",
    "image_size": "image side in pixels",
    "views": "min and max images per product",
    "brands": "number of brands",
    "seasons": "number of seasons (at most 14)",
    "subcategories": "number of garment silhouettes (at most 10)",
    "compositions": "number of fabrics (at most 12)",
    "colours": "number of garment colours (at most 10)",
    "logo_colours": f"number of logo plate colours the brands share (at most {len(_LOGO_COLOURS)})",
    "logo_scale": "draw the brand's logo plate this many times larger (1: a 6-cell plate, 4 x 4 glyph)",
    "label_scale": "draw the season label this many times larger (1: 7 x 3 cells)",
    "keep_apart": "move the logo plate off the season label where they would overlap (large plates)",
}


def add_synth_flags(parser, defaults: SynthSpec | None = None, prefix: str = "") -> None:
    """Add one flag per ``SynthSpec`` field (``--products``, ``--logo-scale``, ...)."""
    defaults = defaults or SynthSpec()
    for name, help_text in _SPEC_HELP.items():
        value = getattr(defaults, name)
        flag = "--" + prefix + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", default=value, help=help_text)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs=2, default=list(value), metavar=("MIN", "MAX"),
                                help=f"{help_text} (default: {value[0]} {value[1]})")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"{help_text} (default: {value})")


def synth_spec_from_args(args, prefix: str = "") -> SynthSpec:
    values = {name: getattr(args, prefix.replace("-", "_") + name) for name in _SPEC_HELP}
    values["views"] = tuple(values["views"])
    return SynthSpec(**values)
