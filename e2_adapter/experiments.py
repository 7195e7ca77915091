"""The FashionSynth experimental setting, shared by the demo and the benchmarks.

A setting is data: which FashionSynth world and products (``SynthSpec``), which zoo model, and how
the coarse-caption base is pre-trained. ``prepare`` writes the data and the base once per output
folder and refuses to reuse a folder prepared for a different setting, so every number a benchmark
prints can be traced back to its command line.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data import TRAIN_FILE, VALIDATION_FILE, FashionGenH5, SynthSpec
from .files import atomic_write_json
from .training.config import TrainConfig
from .zoo import create_clip

# What a web caption knows: colour, garment, fabric. Never the brand or the season.
COARSE_TEMPLATE = "{name}. {composition}"
# The small details E2 is for (a logo plate, a season label): hit rates and region probes report these.
SMALL_ENTITIES = ("brand", "season")


@dataclass(frozen=True)
class Setting:
    data: SynthSpec = field(default_factory=lambda: SynthSpec(val_products=400))
    model: str = "demo"                   # a zoo tiny config (``e2_adapter.zoo.TINY_CONFIGS``)
    pretrain_steps: int = 600
    pretrain_template: str = COARSE_TEMPLATE
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data"] = self.data.to_dict()
        return d

    def describe(self) -> str:
        d = self.data
        return (f"FashionSynth (seed {d.seed}; {d.products} train / {d.val_products} val products, {d.image_size} px, "
                f"{d.brands} brands in {d.logo_colours} logo colours, logo x{d.logo_scale}, label x{d.label_scale}), "
                f"model `{self.model}`, base pre-trained {self.pretrain_steps} steps on `{self.pretrain_template}`")


def add_setting_flags(parser, defaults: Setting | None = None) -> None:
    """The model, the base's pre-training and every FashionSynth knob, as flags."""
    from .data.synth import add_synth_flags
    defaults = defaults or Setting()
    parser.add_argument("--model", default=defaults.model, help=f"zoo tiny config (default: {defaults.model})")
    parser.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    parser.add_argument("--pretrain-template", default=defaults.pretrain_template,
                        help="caption template of the base's pre-training (never name brand or season)")
    parser.add_argument("--prepared", type=Path, default=None,
                        help="reuse the data and base of this earlier --out of the same setting")
    add_synth_flags(parser.add_argument_group("FashionSynth data"), defaults.data)


def setting_from_args(args) -> Setting:
    from .data.synth import synth_spec_from_args
    return Setting(data=synth_spec_from_args(args), model=args.model, pretrain_steps=args.pretrain_steps,
                   pretrain_template=args.pretrain_template)


def prepare(setting: Setting, out: Path, prepared: Path | None = None) -> tuple[Path, Path, Path]:
    """Write the data and pre-train the base into ``out`` (once); returns (train h5, val h5, base.pt).

    ``prepared``: a folder an earlier ``prepare`` of the same setting filled (parallel runs share
    one data set and one base instead of pre-training it again).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if prepared is not None:
        prepared = Path(prepared)
        if not (prepared / "base.pt").is_file():
            raise SystemExit(f"{prepared} holds no prepared setting (no base.pt); run once with --out {prepared}")
        out = prepared
    record = out / "setting.json"
    wanted = setting.to_dict()
    train_path, val_path = out / "data" / TRAIN_FILE, out / "data" / VALIDATION_FILE
    if record.is_file():
        have = json.loads(record.read_text())
        # Data fields added since the folder was prepared have defaults that draw what it was drawn with.
        have["data"] = {**SynthSpec().to_dict(), **have.get("data", {})}
        if have != wanted:
            diff = sorted(k for k in set(have) | set(wanted) if have.get(k) != wanted.get(k))
            raise SystemExit(f"{out} was prepared for another setting (differs in {diff}); "
                             f"use a new --out or delete {out}")
    if not (record.is_file() and train_path.is_file() and val_path.is_file()):
        setting.data.write(out / "data")
    base = out / "base.pt"
    if not base.is_file():
        pretrain_base(setting, train_path, base, out / "pretrain")
    if not record.is_file():
        # Written once and atomically: parallel runs sharing a --prepared folder read it meanwhile.
        atomic_write_json(record, wanted, indent=1)
    return train_path, val_path, base


def pretrain_base(setting: Setting, train_path: Path, path: Path, work: Path) -> None:
    """A plain CLIP trained from scratch on coarse captions (seed 0), saved as a state dict."""
    from .training.checkpoint import atomic_torch_save
    from .training.trainer import Trainer
    steps = setting.pretrain_steps
    bundle = create_clip("open_clip", setting.model, seed=0, image_size=setting.data.image_size)
    coarse = FashionGenH5(train_path, text_template=setting.pretrain_template)
    cfg = TrainConfig(method="clip-ft", stage1_steps=0, stage2_steps=steps, stage2_lr=setting.pretrain_lr,
                      batch_size=setting.pretrain_batch, warmup_steps=max(steps // 20, 1), seed=0,
                      log_every=max(steps // 20, 1))
    Trainer(bundle.model, bundle.tokenizer, bundle.preprocess, coarse, None, cfg, work, "open_clip").fit(overwrite=True)
    atomic_torch_save(bundle.model.state_dict(), path)


def base_model(setting: Setting, base: Path):
    """A fresh bundle of the setting's model holding the base weights."""
    bundle = create_clip("open_clip", setting.model, image_size=setting.data.image_size)
    bundle.model.load_state_dict(torch.load(base, map_location="cpu", weights_only=True))
    return bundle


# The benchmark recipes, as data (TrainConfig JSON read by ``TrainConfig.from_file``), shipped with the package.
RECIPES = Path(__file__).resolve().parent / "recipes"
FINETUNE_RECIPE = RECIPES / "fashionsynth_finetune.json"
VARIANTS_RECIPE = RECIPES / "fashionsynth_variants.json"


def schedule_for(steps: int) -> dict:
    """The fields that follow the run's length: 5% warm-up, 4 validations, 20 log lines."""
    return {"stage2_steps": steps, "warmup_steps": max(steps // 20, 1), "eval_every": max(steps // 4, 1),
            "log_every": max(steps // 20, 1)}


def finetune_config(method: str, steps: int, seed: int, batch_size: int, **overrides) -> TrainConfig:
    """Every method: the same steps, batch, schedule and backbone learning rate (no frozen stage);
    the values are ``recipes/fashionsynth_finetune.json``. ``overrides``: TrainConfig fields, the
    adapter's as ``adapter={...}`` (merged into the recipe's section), e.g. a benchmark variant."""
    return TrainConfig.from_file(FINETUNE_RECIPE, **{"method": method, **overrides, **schedule_for(steps),
                                                    "seed": seed, "batch_size": batch_size})


def finetune_variants() -> dict[str, dict]:
    """The benchmark's variants, in run order: name -> TrainConfig overrides of the fine-tuning recipe
    (``recipes/fashionsynth_variants.json``; each names its method and, for E2, its adapter preset,
    so a run never depends on the library's default: "e2" is the paper's faithful layout)."""
    return json.loads(VARIANTS_RECIPE.read_text())


def default_batch() -> int:
    """The fine-tuning recipe's batch (the demo's and the benchmark's unless a run names another)."""
    return json.loads(FINETUNE_RECIPE.read_text())["batch_size"]
