"""TrainConfig: the recipe as data. Every field can be set from a JSON file (``--config``, read by
``TrainConfig.from_file``) and then from command-line flags, which are generated from the fields
(help text in each field's metadata, as peft does).

The adapter is one nested section, an ``E2Config``: in JSON ``{"method": "e2", "adapter": {"preset":
"lean", "qk_rank": 16}, ...}``, on the command line its fields' own flags (``--preset``, ``--qk-rank``,
``--gated``, ``--token-init``, ...). Its ``entities`` are the tags every method's tag losses use
(``clip-ft-tags`` too); its layout only applies to ``method="e2"``. A config written before the
section existed (``preset`` / ``entities`` / ``tokens_per_entity`` / ``fusion_after`` at the top
level) still loads, with a warning that says how to write it now.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ..config import LAYOUT_FIELDS, PRESET_LAYOUTS, E2Config, dataclass_from_dict, option

METHODS = ("e2", "clip-ft", "clip-ft-tags")
# E2Config fields a training config does not set: read from the model at wrap time, or (gumbel_tau)
# the trainer's tau_start, which it anneals.
ADAPTER_FIELDS_NOT_TRAINED = ("family", "width", "embed_dim", "num_blocks", "version", "gumbel_tau")
# Where these sat before the adapter section: the top level of the training config.
FLAT_ADAPTER_FIELDS = ("preset", "entities", "tokens_per_entity", "fusion_after")


def merge_adapter(base: dict, over: dict) -> dict:
    """``base`` adapter section updated by ``over``. A new preset re-derives its layout: a base
    gated / drop_patches / qk_rank that only repeats the old preset's value goes (unless ``over``
    sets it), so --preset gated over a saved faithful config is gated, not a contradiction, while a
    value the old preset would not have chosen (qk_rank=8) stays."""
    merged = dict(base)
    old = base.get("preset")
    if "preset" in over and over["preset"] != old and old in PRESET_LAYOUTS:
        for name in LAYOUT_FIELDS:
            if name in merged and merged[name] == PRESET_LAYOUTS[old][name]:
                del merged[name]
    merged.update(over)
    return merged


def nest_flat_fields(d: dict, source: str = "training config", warn: bool = True) -> dict:
    """A training config dict with the adapter fields at the top level (the format before the
    ``adapter`` section) moved into that section."""
    flat = [k for k in FLAT_ADAPTER_FIELDS if k in d]
    if not flat:
        return d
    d = dict(d)
    moved = {k: d.pop(k) for k in flat}
    if warn:
        warnings.warn(f"{source}: {flat} now live in the 'adapter' section; read as \"adapter\": "
                      f"{json.dumps(moved)}. Write them there (the top-level form will be removed).",
                      FutureWarning, stacklevel=3)
    d["adapter"] = merge_adapter(d.get("adapter") or {}, moved)
    return d


@dataclass
class TrainConfig:
    method: str = option("e2", "e2 | clip-ft (the baseline) | clip-ft-tags (tag losses on CLS, no E2)")
    adapter: E2Config = option(E2Config, "the E2 adapter (an E2Config): layout for method e2, entities for every method")
    # Stage 1: only E2's new parameters train. Stage 2: everything (or LoRA + E2 when lora_rank > 0).
    stage1_epochs: float = option(5, "stage 1 (E2's new parameters only) length in epochs")
    stage1_lr: float = option(5e-4, "stage 1 learning rate")
    stage2_epochs: float = option(20, "stage 2 (everything, or LoRA + E2) length in epochs")
    stage2_lr: float = option(5e-5, "stage 2 learning rate of the CLIP weights")
    adapter_lr: float | None = option(None, "E2 parameters' learning rate in stage 2 (default: stage2_lr)")
    stage1_steps: int | None = option(None, "stage 1 length in optimizer steps (overrides the epochs)")
    stage2_steps: int | None = option(None, "stage 2 length in optimizer steps (overrides the epochs)")
    batch_size: int = option(64, "global batch (split across processes under torchrun)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    warmup_steps: int = option(100, "linear warm-up steps of each stage's cosine schedule")
    global_weight: float = option(0.5, "loss = global_weight * global + region_weight * mean(region)")
    region_weight: float = option(0.5, "weight of the mean region (tag) loss")
    tau_start: float = option(1.0, "Gumbel temperature at the first step (the adapter's gumbel_tau), annealed linearly")
    tau_end: float = option(1.0, "Gumbel temperature at the last step")
    lora_rank: int = option(0, "peft LoRA rank in stage 2 (0: train every CLIP weight)")
    lora_targets: tuple[str, ...] | None = option(None, "LoRA target modules (default: the family backend's MLP linears)")
    amp: str = option("auto", "auto (fp16 on CUDA, fp32 on CPU) | fp16 | bf16 | none")
    grad_accum: int = option(1, "batches accumulated per optimizer step")
    grad_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)")
    eval_protocol: str = option("product-full", "validation protocol that picks the best checkpoint")
    eval_every: int = option(0, "steps between validations (0: at each epoch end)")
    checkpoint_every: int = option(0, "steps between checkpoints (0: at each epoch end only)")
    caption_replay: str | None = option(None, "a second caption style kept in the training mix, as a text template "
                                        "over the catalogue's fields (e.g. the pre-training's '{name}. {composition}'), "
                                        "so fine-tuning does not forget it; FashionGen-layout data only")
    caption_replay_fraction: float = option(0.25, "share of training captions drawn in the caption_replay style")
    seed: int = option(0, "seed of data order and new parameters")
    num_workers: int = option(0, "DataLoader workers")
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    log_every: int = option(10, "steps between log lines")

    @property
    def entities(self) -> tuple[str, ...]:
        """The tag entities (the adapter's): what every method's tag losses are computed on."""
        return self.adapter.entities

    def __post_init__(self):
        if isinstance(self.adapter, dict):
            self.adapter = E2Config.from_dict(self.adapter)
        if not isinstance(self.adapter, E2Config):
            raise ValueError(f"adapter must be an E2Config or its dict, got {type(self.adapter).__name__}")
        model_info = [k for k in ("family", "width", "embed_dim", "num_blocks") if getattr(self.adapter, k) is not None]
        if model_info:
            raise ValueError(f"adapter fields {model_info} are read from the model when it is wrapped; "
                             "leave them out of a training config")
        self.betas = tuple(self.betas)
        if self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: contrastive losses need in-batch negatives")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be >= 1")
        if self.amp not in ("auto", "fp16", "bf16", "none"):
            raise ValueError(f"amp must be auto, fp16, bf16 or none, got {self.amp!r}")
        self._check_ranges()
        self.adapter = replace(self.adapter, gumbel_tau=self.tau_start)  # the trainer anneals from tau_start

    def _check_ranges(self) -> None:
        """Every number and name checked here, before any data is read or any step is trained."""
        from ..evaluation.retrieval import PROTOCOLS

        def flag(name):
            return f"{name} (--{name.replace('_', '-')})"
        at_least = {"stage1_epochs": 0, "stage2_epochs": 0, "stage1_lr": 0, "stage2_lr": 0, "adapter_lr": 0,
                    "stage1_steps": 0, "stage2_steps": 0, "warmup_steps": 0, "weight_decay": 0,
                    "global_weight": 0, "region_weight": 0, "lora_rank": 0, "eval_every": 0,
                    "checkpoint_every": 0, "num_workers": 0, "log_every": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and not value >= low:  # "not >=" also rejects NaN
                raise ValueError(f"{flag(name)} must be >= {low}, got {value}")
        for name in ("tau_start", "tau_end"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag(name)} must be > 0 (a Gumbel-softmax temperature), got {getattr(self, name)}")
        if self.caption_replay is not None and not 0 < self.caption_replay_fraction < 1:
            raise ValueError(f"{flag('caption_replay_fraction')} must be between 0 and 1 (exclusive), "
                             f"got {self.caption_replay_fraction}")
        if self.global_weight == 0 and self.region_weight == 0:
            raise ValueError("global_weight and region_weight are both 0: nothing would be trained")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas (--betas) must be two numbers in [0, 1), got {self.betas}")
        if self.eval_protocol not in PROTOCOLS:
            raise ValueError(f"unknown eval_protocol {self.eval_protocol!r} (--eval-protocol); "
                             f"choose one of {sorted(PROTOCOLS)}")
        fusion_after = self.adapter.fusion_after
        if fusion_after is not None and any(i < 1 for i in fusion_after):
            raise ValueError(f"fusion_after (--fusion-after) positions are 1-based block indices, got {fusion_after}")
        if self.device != "auto":
            import torch
            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise ValueError(f"unknown device {self.device!r} (--device); use auto, cpu, cuda or cuda:N") from err

    def to_dict(self) -> dict:
        d = json.loads(json.dumps(asdict(self)))
        d["adapter"] = {k: v for k, v in self.adapter.to_dict().items() if k not in ADAPTER_FIELDS_NOT_TRAINED}
        return d

    @classmethod
    def from_dict(cls, d: dict, warn: bool = True) -> "TrainConfig":
        d = nest_flat_fields(d, warn=warn)
        adapter = dict(d.get("adapter") or {})
        tau = d.get("tau_start", cls.tau_start)
        if "gumbel_tau" in adapter and adapter.pop("gumbel_tau") != tau:
            raise ValueError("adapter.gumbel_tau is the trainer's tau_start (--tau-start); set that instead")
        for name in ("version",) + ADAPTER_FIELDS_NOT_TRAINED[:4]:
            if adapter.get(name) is None:
                adapter.pop(name, None)
        unknown = sorted(set(adapter) - {f.name for f in fields(E2Config)})
        if unknown:
            raise ValueError(f"adapter section: unknown fields {unknown}; known: {sorted(adapter_flag_fields())}")
        return dataclass_from_dict(cls, {**d, "adapter": E2Config(**adapter)}, "training options")

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        """The JSON file's config, then ``overrides`` (flat TrainConfig fields, and ``adapter``: a dict
        of adapter fields merged into the file's section)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        d = nest_flat_fields(json.loads(path.read_text()), source=f"training config {path}")
        over = dict(overrides)
        if "adapter" in over:
            d["adapter"] = merge_adapter(d.get("adapter") or {}, dict(over.pop("adapter")))
        return cls.from_dict({**d, **over})

    def updated(self, **changes) -> "TrainConfig":
        """A copy with ``changes``: TrainConfig fields, and adapter fields either flat (``preset=``) or
        as ``adapter={...}``, merged into the section (a new preset re-derives its layout)."""
        d = self.to_dict()
        adapter = dict(changes.pop("adapter", None) or {})
        adapter.update({k: changes.pop(k) for k in list(changes) if k in adapter_flag_fields()})
        d["adapter"] = merge_adapter(d["adapter"], adapter)
        return self.from_dict({**d, **changes})


def adapter_flag_fields() -> tuple[str, ...]:
    """The E2Config fields a training config sets (and the CLI has flags for)."""
    return tuple(f.name for f in fields(E2Config) if f.name not in ADAPTER_FIELDS_NOT_TRAINED)
