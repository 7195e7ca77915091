"""E2Config: everything that defines an adapter, round-tripping to ``adapter_config.json``.

Sizes of the wrapped model (width, depth, output dim) are read from the model at wrap time and
recorded here, so that loading an adapter into a different model fails with a clear message.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .files import atomic_write_json

CONFIG_NAME = "adapter_config.json"
DEFAULT_ENTITIES = ("brand", "season", "subcategory", "composition")
PRESETS = ("auto", "faithful", "lean", "gated")
# "auto" is decided by the tower (``E2Config.for_tower``): the paper's faithful layout where the global
# embedding is the class token, which on FashionSynth's calibrated world led CLIP-FT and gated by
# 12-14 product-full SumR over 3 seeds (README, round 2); gated where the tower pools its patches,
# the one layout that can keep them (SigLIP's MAP head, average pooling).
DEFAULT_PRESET = "auto"
LEAN_QK_RANK = 32  # keeps ViT-B/32's overhead under the paper's 1.9% (benchmarks/overhead.py)
CONFIG_VERSION = 2  # 2: presets resolved into the layout fields (1 wrote drop_patches=True for gated)
# What each preset sets. A field left at None takes its preset's value; an explicit value that
# contradicts the preset is an error, so the saved config always says what runs.
PRESET_LAYOUTS = {
    "faithful": {"gated": False, "drop_patches": True, "qk_rank": None},
    "lean": {"gated": False, "drop_patches": True, "qk_rank": LEAN_QK_RANK},
    "gated": {"gated": True, "drop_patches": False, "qk_rank": None},
}


LAYOUT_FIELDS = ("gated", "drop_patches", "qk_rank")  # what a preset decides


def option(default, help: str):
    """A dataclass field with its help text in the metadata, as peft keeps it: the CLI's flags and
    their help are generated from the fields (``e2_adapter.cli.add_dataclass_flags``)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def dataclass_from_dict(cls, d: dict, what: str):
    """``cls(**d)``, but an unknown key is a clear error naming it and the known ones."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{what}: unknown fields {unknown}; known: {sorted(known)}")
    return cls(**d)


@dataclass
class E2Config:
    """How E2 is laid into a CLIP vision tower. Each field's help is in its metadata (``help``)."""
    entities: tuple[str, ...] = option(DEFAULT_ENTITIES, "the tag entities, each with its own selection tokens "
                                       "and region head")
    tokens_per_entity: int = option(2, "selection tokens per entity (the paper uses 2)")
    fusion_after: tuple[int, ...] | None = option(
        None, "1-based indices of the blocks after which a fusion block runs; unset derives them from the depth "
        "(after ~2/3 of the blocks and after the second-to-last: 8 and 11 of 12); empty means no fusion blocks "
        "(an ablation)")
    drop_patches: bool | None = option(
        None, "drop the patch tokens after the last fusion block (the paper's layout; never with gated, where the "
        "class token still reads the patches in the last block); unset: the preset's")
    qk_rank: int | None = option(None, "width of the fusion blocks' query/key space; unset: the preset's (the tower "
                                 "width; lean: 32)")
    gumbel_tau: float = option(1.0, "Gumbel-softmax temperature of the hard selection during training")
    gated: bool | None = option(
        None, "start where CLIP is: class and patch tokens never attend to the selection tokens, which reach the "
        "global embedding only through a zero-initialised gate (the global embedding equals the original's at "
        "step 0); unset: the preset's")
    token_init: str = option(
        "normal", "normal: each selection token drawn independently, like CLIP's class embedding; cls: every "
        "token starts at the class token plus small noise (they then pick the same patches: in the first demo "
        "run still collapsed after 600 steps, hence normal)")
    preset: str = option(DEFAULT_PRESET, "the layout (PRESET_LAYOUTS): faithful, lean or gated, or auto (faithful "
                         "for a class-token tower, gated for one that pools its patches; wrap decides); fills "
                         "gated, drop_patches and qk_rank where unset and rejects values that contradict it")
    # Filled in by wrap() from the model, checked by load_adapter().
    family: str | None = option(None, "the model's CLIP family (set by wrap)")
    width: int | None = option(None, "the tower width (set by wrap)")
    embed_dim: int | None = option(None, "the joint-space width (set by wrap)")
    num_blocks: int | None = option(None, "the tower depth (set by wrap)")
    version: int = option(CONFIG_VERSION, "adapter_config.json format version")

    def __post_init__(self):
        if isinstance(self.entities, str):
            raise ValueError(f"entities must be a sequence of names, got the string {self.entities!r}; "
                             f"write entities=({self.entities!r},)")
        self.entities = tuple(self.entities)
        if self.fusion_after is not None:
            self.fusion_after = tuple(int(i) for i in self.fusion_after)
        if not self.entities:
            raise ValueError("E2Config.entities is empty: name at least one tag entity, e.g. ('brand',)")
        repeated = sorted({e for e in self.entities if self.entities.count(e) > 1})
        if repeated:
            raise ValueError(f"E2Config.entities repeats {repeated}: each entity needs a unique name")
        for name in self.entities:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"entity name {name!r} must be a Python identifier (letters, digits, _)")
        if self.tokens_per_entity < 1:
            raise ValueError(f"tokens_per_entity must be >= 1, got {self.tokens_per_entity}")
        if self.qk_rank is not None and self.qk_rank < 1:
            raise ValueError(f"qk_rank must be >= 1 or None, got {self.qk_rank}")
        if self.gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be > 0, got {self.gumbel_tau}")
        if self.token_init not in ("cls", "normal"):
            raise ValueError(f"token_init must be 'cls' or 'normal', got {self.token_init!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {PRESETS}")
        self._resolve_preset()

    def _resolve_preset(self) -> None:
        if self.preset == "auto":
            if self.gated is None and self.drop_patches is None:
                return  # the tower decides (for_tower); qk_rank, if given, stays as given
            self.preset = "gated" if self.gated or self.drop_patches is False else "faithful"  # a given layout field decides
        layout = PRESET_LAYOUTS[self.preset]
        for name in ("gated", "drop_patches"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, layout[name])
            elif bool(value) != layout[name]:
                raise ValueError(f"{name}={value} contradicts preset {self.preset!r} ({name}={layout[name]}); "
                                 f"choose the preset that has it ({self._presets_with(name, bool(value))})")
        if self.qk_rank is None:
            self.qk_rank = layout["qk_rank"]

    @staticmethod
    def _presets_with(name: str, value) -> str:
        return ", ".join(p for p, layout in PRESET_LAYOUTS.items() if layout[name] == value) or "none"

    @classmethod
    def from_preset(cls, name: str = DEFAULT_PRESET, **overrides) -> "E2Config":
        """``faithful``: the paper's layout. ``lean``: low-rank fusion q/k (<= 1.9% extra parameters
        on ViT-B/32). ``gated``: the faithful layout that starts exactly where CLIP is. ``auto`` (the
        default): faithful, or gated for a tower that pools its patches."""
        return cls(preset=name, **overrides)

    def for_tower(self, pools_patches: bool) -> "E2Config":
        """The config with ``auto`` decided for a tower: gated if it pools its patches, else faithful."""
        if self.preset != "auto":
            return self
        return replace(self, preset="gated" if pools_patches else "faithful")

    @property
    def num_tokens(self) -> int:
        return len(self.entities) * self.tokens_per_entity

    def resolve_fusion_after(self, num_blocks: int) -> tuple[int, ...]:
        """Fusion positions for a tower of ``num_blocks`` blocks, validated."""
        if self.fusion_after == ():
            return ()  # the "no fusion blocks" ablation: tokens only attend, never pick a patch
        if self.fusion_after is not None:
            positions = tuple(sorted(set(self.fusion_after)))
        else:
            positions = tuple(sorted({max(1, round(2 * num_blocks / 3)), max(1, num_blocks - 1)}))
        bad = [p for p in positions if not 1 <= p <= num_blocks]
        if bad or not positions:
            raise ValueError(f"fusion_after={positions} is invalid for a tower of {num_blocks} blocks: "
                             f"each position must lie in 1..{num_blocks}")
        return positions

    def with_model_info(self, **info) -> "E2Config":
        return replace(self, **info)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["entities"] = list(self.entities)
        d["fusion_after"] = list(self.fusion_after) if self.fusion_after is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "E2Config":
        d = dict(d)
        if d.get("version", 1) == 1:
            # Version 1 wrote drop_patches=True for gated adapters, which never dropped them, and
            # E2Config(preset=...) did not apply the preset: keep what actually ran.
            if d.get("gated"):
                d["drop_patches"] = False
            if "gated" in d:
                d["preset"] = ("gated" if d["gated"] else "lean" if d.get("qk_rank") else "faithful")
            d["version"] = CONFIG_VERSION
        return dataclass_from_dict(cls, d, "adapter config (written by a newer e2-adapter?)")

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / CONFIG_NAME
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "E2Config":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: is this an adapter saved by save_adapter()?")
        return cls.from_dict(json.loads(path.read_text()))
