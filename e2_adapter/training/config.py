"""TrainConfig: the recipe as data. Defaults are the paper's (spec section 3); every field can be set
from a JSON file (``--config``) and then from command-line flags."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import DEFAULT_ENTITIES, DEFAULT_PRESET, dataclass_from_dict

METHODS = ("e2", "clip-ft", "clip-ft-tags")


@dataclass
class TrainConfig:
    method: str = "e2"                 # e2 | clip-ft (baseline) | clip-ft-tags (tag losses on CLS, no E2)
    preset: str = DEFAULT_PRESET       # E2 preset: gated (default) | faithful | lean
    entities: tuple[str, ...] = DEFAULT_ENTITIES
    tokens_per_entity: int = 2
    fusion_after: tuple[int, ...] | None = None   # () = no fusion blocks (an ablation)
    # Stage 1: only E2's new parameters train. Stage 2: everything (or LoRA + E2 when lora_rank > 0).
    stage1_epochs: float = 5
    stage1_lr: float = 5e-4
    stage2_epochs: float = 20
    stage2_lr: float = 5e-5
    adapter_lr: float | None = None    # E2 parameters' lr in stage 2 (default: stage2_lr)
    stage1_steps: int | None = None    # explicit step counts override the epochs
    stage2_steps: int | None = None
    batch_size: int = 64
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    global_weight: float = 0.5         # loss = global_weight * global + region_weight * mean(region)
    region_weight: float = 0.5
    tau_start: float = 1.0             # Gumbel temperature, annealed linearly over all steps
    tau_end: float = 1.0
    lora_rank: int = 0
    lora_targets: tuple[str, ...] | None = None   # default: the family's MLP linears
    amp: str = "auto"                  # auto (fp16 on CUDA, fp32 on CPU) | fp16 | bf16 | none
    grad_accum: int = 1
    grad_checkpointing: bool = False
    eval_protocol: str = "product-full"
    eval_every: int = 0                # steps between validations (0: at each epoch end)
    checkpoint_every: int = 0          # steps between checkpoints (0: at each epoch end only)
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"
    log_every: int = 10

    def __post_init__(self):
        self.entities = tuple(self.entities)
        self.betas = tuple(self.betas)
        if self.fusion_after is not None:
            self.fusion_after = tuple(self.fusion_after)
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

    def _check_ranges(self) -> None:
        """Every number and name checked here, before any data is read or any step is trained."""
        from ..config import PRESETS
        from ..evaluation.retrieval import PROTOCOLS

        def flag(name):
            return f"{name} (--{name.replace('_', '-')})"
        at_least = {"stage1_epochs": 0, "stage2_epochs": 0, "stage1_lr": 0, "stage2_lr": 0, "adapter_lr": 0,
                    "stage1_steps": 0, "stage2_steps": 0, "warmup_steps": 0, "weight_decay": 0,
                    "global_weight": 0, "region_weight": 0, "lora_rank": 0, "eval_every": 0,
                    "checkpoint_every": 0, "num_workers": 0, "tokens_per_entity": 1, "log_every": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and not value >= low:  # "not >=" also rejects NaN
                raise ValueError(f"{flag(name)} must be >= {low}, got {value}")
        for name in ("tau_start", "tau_end"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag(name)} must be > 0 (a Gumbel-softmax temperature), got {getattr(self, name)}")
        if self.global_weight == 0 and self.region_weight == 0:
            raise ValueError("global_weight and region_weight are both 0: nothing would be trained")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas (--betas) must be two numbers in [0, 1), got {self.betas}")
        if self.eval_protocol not in PROTOCOLS:
            raise ValueError(f"unknown eval_protocol {self.eval_protocol!r} (--eval-protocol); "
                             f"choose one of {sorted(PROTOCOLS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (--preset); choose one of {PRESETS}")
        if not self.entities:
            raise ValueError("entities (--entities) is empty: name at least one tag entity, e.g. brand")
        if self.fusion_after is not None and any(i < 1 for i in self.fusion_after):
            raise ValueError(f"fusion_after (--fusion-after) positions are 1-based block indices, got {self.fusion_after}")
        if self.device != "auto":
            import torch
            try:
                torch.device(self.device)
            except RuntimeError as err:
                raise ValueError(f"unknown device {self.device!r} (--device); use auto, cpu, cuda or cuda:N") from err

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return dataclass_from_dict(cls, d, "training options")

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        return cls.from_dict({**json.loads(path.read_text()), **overrides})
