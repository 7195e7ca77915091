"""The two-stage E2 recipe, readable top to bottom:

    prepare the model (wrap for E2, LoRA if asked)
    for each stage (1: only E2's new parameters; 2: everything):
        for each step: a batch of products (one random view each) -> loss -> optimizer step
        at each epoch end: validate (SumR), checkpoint, keep the best
The same loop trains the CLIP-FT baseline (method "clip-ft"), so comparisons differ only in the method.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..backends import backend_for, unwrap_peft
from ..torch_utils import model_device
from ..wrap import encode_image_regions, get_adapter, get_backend, is_wrapped, wrap
from ..data.catalogue import ProductCatalogue
from ..data.datasets import TrainViews, collate
from ..data.mixed import MixedCaptions
from ..evaluation.embed import evaluate
from ..evaluation.report import save_json
from ..files import atomic_write_text
from ..losses import e2_loss, e2_loss_share, pair_loss, pair_loss_share
from .checkpoint import (CheckpointError, atomic_torch_save, load_checkpoint, remove_stale_temporaries, rng_state,
                         set_rng_state)
from .distributed import gather_rows, mean_over_ranks, plan_tag_texts, rank_and_world, row_counts
from .config import TrainConfig


class TrainingDiverged(RuntimeError):
    pass


# What a run writes into its folder: finding any of these means the folder holds a run.
RUN_FILES = ("checkpoint_last.pt", "metrics.jsonl", "train_config.json", "best")
# Options that may change on --resume: they do not change what is trained.
RESUMABLE_CHANGES = ("device", "num_workers", "log_every", "checkpoint_every")


@dataclass
class Stage:
    name: str
    steps: int
    lr: float
    adapter_only: bool


@dataclass
class TrainState:
    stage: int = 0           # index into the stage list
    stage_step: int = 0      # optimizer steps done in this stage
    step: int = 0            # optimizer steps done overall
    best_sumr: float = -math.inf
    best_step: int = -1
    history: list = field(default_factory=list)
    train_seconds: float = 0.0  # wall clock of the steps (validation included), summed over resumes


# --- model preparation ------------------------------------------------------------------------

def prepare_model(model: nn.Module, cfg: TrainConfig, family: str) -> nn.Module:
    """E2: wrap the vision tower. LoRA: add peft adapters to both towers (E2 stays trainable)."""
    if cfg.method == "e2":
        wrap(model, config=cfg.adapter)  # its gumbel_tau is cfg.tau_start, annealed by the loop
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    elif cfg.grad_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    if cfg.lora_rank > 0:
        from peft import LoraConfig, get_peft_model
        targets = list(cfg.lora_targets or backend_for(model).lora_targets)
        if not targets:
            raise ValueError(f"the {backend_for(model).family} backend names no default LoRA targets: "
                             "set lora_targets (--lora-targets)")
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=targets))
    return model


def fp32_master_weights(model: nn.Module) -> bool:
    """Half-precision weights (``clip.load`` on CUDA, open_clip's ``convert_weights_to_lp``) are trained
    as fp32 master weights: autocast still computes in half precision, but AdamW's update and the fp16
    GradScaler's unscale need fp32 parameters (on a GPU: "Attempting to unscale FP16 gradients").
    Returns whether anything was cast; the saved adapter and model are then fp32."""
    if all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point()):
        return False
    model.float()
    return True


def stages_for(cfg: TrainConfig, steps_per_epoch: int, has_adapter: bool) -> list[Stage]:
    s1 = cfg.stage1_steps if cfg.stage1_steps is not None else round(cfg.stage1_epochs * steps_per_epoch)
    s2 = cfg.stage2_steps if cfg.stage2_steps is not None else round(cfg.stage2_epochs * steps_per_epoch)
    stages = []
    if has_adapter and s1 > 0:  # CLIP-FT has no new parameters, so no stage 1
        stages.append(Stage("stage1", s1, cfg.stage1_lr, adapter_only=True))
    if s2 > 0:
        stages.append(Stage("stage2", s2, cfg.stage2_lr, adapter_only=False))
    return stages


def set_trainable(model: nn.Module, stage: Stage, lora: bool) -> tuple[list[nn.Parameter], set[int]]:
    """Freeze per stage; return the trainable parameters and the ids of E2's among them."""
    has_adapter = is_wrapped(model)
    adapter_ids = {id(p) for p in get_adapter(model).parameters()} if has_adapter else set()
    for name, p in model.named_parameters():
        if stage.adapter_only:
            p.requires_grad_(id(p) in adapter_ids)
        elif lora:
            p.requires_grad_(id(p) in adapter_ids or "lora_" in name)
        else:
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad], adapter_ids


# --- the loss ----------------------------------------------------------------------------------

class ContrastiveObjective(nn.Module):
    """One module computing the whole loss, so DDP sees a single forward.

    Under torchrun each rank gets its slice of the global batch; features, tag values and tag-text
    embeddings are gathered (with gradients) so the losses see the whole global batch. Each rank
    returns ``world x`` its share of the one-process loss: DDP's gradient averaging then gives exactly
    the one-process gradient, and the mean of the ranks' values is the one-process loss.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, tokenizer):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tag_cache: dict[str, torch.Tensor] = {}  # valid while the text tower is frozen
        self.backend = get_backend(model)  # looked up once: the model's structure is fixed from here on

    def fill_tag_cache(self, values, chunk: int = 256) -> None:
        """Encode every tag value up front, sorted and in fixed chunks, so the frozen-text cache is a
        function of the data alone: a run resumed in stage 1 gets bit-identical tag embeddings
        (filled lazily, each value's embedding depended on which batch first asked for it)."""
        self.tag_cache.clear()
        values = sorted(set(values))
        device = model_device(self.model)
        with torch.no_grad():
            for i in range(0, len(values), chunk):
                part = values[i:i + chunk]
                self.tag_cache.update(zip(part, self.backend.encode_text(self.tokenizer(part).to(device)).detach()))

    def encode_tags(self, values: list[str], text_frozen: bool) -> torch.Tensor:
        backend = self.backend
        device = model_device(self.model)
        if not text_frozen:
            self.tag_cache.clear()
            return backend.encode_text(self.tokenizer(values).to(device))
        missing = [v for v in values if v not in self.tag_cache]
        if missing:
            with torch.no_grad():
                emb = backend.encode_text(self.tokenizer(missing).to(device)).detach()
            self.tag_cache.update(zip(missing, emb))
        return torch.stack([self.tag_cache[v] for v in values])

    def forward(self, images: torch.Tensor, texts: list[str], tags: dict[str, list[str]], text_frozen: bool):
        backend = self.backend
        device = images.device
        rank, world = rank_and_world()
        with torch.no_grad() if text_frozen else nullcontext():
            text = backend.encode_text(self.tokenizer(texts).to(device))
        scale = backend.logit_scale
        # the model's own loss family: SigLIP's pairwise sigmoid (with its logit bias) or CLIP's InfoNCE
        family = {"loss": backend.loss_family, "logit_bias": backend.logit_bias}
        if self.cfg.method == "clip-ft":
            image = backend.encode_image(images)
            if world == 1:
                return {"loss": pair_loss(image, text, scale, **family)}
            counts, rows = self.my_rows(image, rank)
            return {"loss": world * pair_loss_share(gather_rows(image, counts), gather_rows(text, counts), rows,
                                                    scale, **family)}
        if self.cfg.method == "e2":
            out = encode_image_regions(self.model, images)
            image, regions = out.image, out.regions
        else:  # clip-ft-tags: the tag losses on CLIP's own global embedding, no selection tokens
            image = backend.encode_image(images)
            regions = {e: image for e in self.cfg.entities}
        # One text-tower call per rank for its share of the distinct tag values of the global batch.
        plan = plan_tag_texts({e: tags[e] for e in regions})
        mine = self.encode_tags(plan.mine, text_frozen) if plan.mine else text.new_zeros((0, text.shape[1]))
        tag_text = plan.assemble(gather_rows(mine, plan.counts))
        weights = (self.cfg.global_weight, self.cfg.region_weight)
        if world == 1:
            return e2_loss(image, text, regions, plan.ids, tag_text, scale, *weights, **family)
        counts, rows = self.my_rows(image, rank)
        gathered: dict[int, torch.Tensor] = {}  # clip-ft-tags uses one tensor for every entity: gather it once
        def everyone(x):
            return gathered.setdefault(id(x), gather_rows(x, counts))
        parts = e2_loss_share(everyone(image), everyone(text), {e: everyone(r) for e, r in regions.items()},
                              plan.ids, tag_text, rows, scale, *weights, **family)
        return {k: world * v for k, v in parts.items()}

    @staticmethod
    def my_rows(local: torch.Tensor, rank: int) -> tuple[list[int], slice]:
        counts = row_counts(local.shape[0], local.device)
        start = sum(counts[:rank])
        return counts, slice(start, start + counts[rank])


# --- data order ---------------------------------------------------------------------------------

def epoch_batches(num_products: int, catalogue: ProductCatalogue, batch_size: int, seed: int, epoch: int,
                  rank: int = 0, world: int = 1) -> list[list[tuple[int, ...]]]:
    """The (product, view) pairs of every batch of an epoch, a pure function of (seed, epoch), so a
    resumed run and an uninterrupted one see identical data (for a ``MixedCaptions`` catalogue,
    (product, view, caption style) triples). ``batch_size`` is the global batch for
    every world size: each rank takes every world-th pair of it, and the losses gather the whole batch."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_products, generator=g).tolist()
    views = torch.rand(num_products, generator=g).tolist()
    pairs = [(p, int(views[p] * catalogue.num_views(p))) for p in order]
    replay = getattr(catalogue, "style_probability", 0.0)  # MixedCaptions: drawn after the views, which stay as they were
    if replay:
        styles = (torch.rand(num_products, generator=g) < replay).tolist()
        pairs = [(p, view, int(styles[p])) for p, view in pairs]
    full = len(pairs) // batch_size  # drop the last partial batch: contrastive losses like equal batches
    return [pairs[i * batch_size:(i + 1) * batch_size][rank::world] for i in range(full)]


def replay_captions(catalogue: ProductCatalogue, cfg: TrainConfig) -> ProductCatalogue:
    """The training catalogue, with ``cfg.caption_replay``'s style mixed into its captions if set."""
    if cfg.caption_replay is None:
        return catalogue
    if not hasattr(catalogue, "with_text_template"):
        raise ValueError(f"caption_replay (--caption-replay) re-reads the training texts with another template, "
                         f"which {type(catalogue).__name__} cannot; use FashionGen-layout (h5) training data")
    return MixedCaptions(catalogue, catalogue.with_text_template(cfg.caption_replay), cfg.caption_replay_fraction)


# --- the trainer -------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu (or auto)")
    return device


def amp_dtype(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


class Trainer:
    def __init__(self, model: nn.Module, tokenizer, transform, train: ProductCatalogue,
                 val: ProductCatalogue | None, cfg: TrainConfig, out_dir: str | os.PathLike, family: str,
                 progress: bool = True):
        self.cfg, self.train_data, self.val_data = cfg, replay_captions(train, cfg), val
        self.tokenizer, self.transform, self.family = tokenizer, transform, family
        self.out = Path(out_dir)
        self.progress = progress
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.device = pick_device(cfg.device)
        if self.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        missing = [e for e in cfg.entities if e not in train.entities] if cfg.method != "clip-ft" else []
        if missing:
            raise ValueError(f"entities {missing} are not tags of the training data (it has {train.entities}); "
                             "pass --entities with a subset of those")
        if cfg.batch_size < self.world:
            raise ValueError(f"--batch-size is the global batch, split across the {self.world} processes; "
                             f"{cfg.batch_size} leaves some with no rows: use at least {self.world}")
        if len(train) // cfg.batch_size < cfg.grad_accum:  # an optimizer step needs grad_accum full batches
            raise ValueError(f"the training data has {len(train)} products, fewer than one batch of "
                             f"{cfg.batch_size * cfg.grad_accum} per optimizer step (--batch-size {cfg.batch_size} "
                             f"x --grad-accum {cfg.grad_accum}); lower either")
        torch.manual_seed(cfg.seed)
        self.model = prepare_model(model, cfg, family).to(self.device)
        if fp32_master_weights(self.model):
            warnings.warn("the model's weights are half precision: training them as fp32 (autocast, --amp, "
                          "keeps the compute in half precision)", stacklevel=2)
        self.objective = ContrastiveObjective(self.model, cfg, tokenizer)
        # An epoch is a whole number of optimizer steps of grad_accum batches each.
        self.steps_per_epoch = max(len(train) // cfg.batch_size // cfg.grad_accum, 1)
        self.batches_per_epoch = self.steps_per_epoch * cfg.grad_accum
        self.adapter = get_adapter(self.model) if is_wrapped(self.model) else None
        self.stages = stages_for(cfg, self.steps_per_epoch, self.adapter is not None)
        self.total_steps = sum(s.steps for s in self.stages)
        self.state = TrainState()
        self.last_checkpoint_step: int | None = None
        self.amp = amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp == torch.float16)

    # -- the recipe ----------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False) -> TrainState:
        """Train. ``resume``: continue the run in ``out``. ``overwrite``: delete the run already in
        ``out`` first. With neither, a folder that holds a run is refused, so no run is lost."""
        checkpoint = self.open_run_folder(resume, overwrite)
        if checkpoint:
            self.check_resumable(checkpoint)
            self.model.load_state_dict(checkpoint["model"])
            self.state = TrainState(**checkpoint["state"])
            self.last_checkpoint_step = self.state.step
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_json(self.out / "train_config.json", self.cfg.to_dict())
            if checkpoint:
                self.drop_metrics_after(self.state.step)
        for index in range(self.state.stage, len(self.stages)):
            stage = self.stages[index]
            if index != self.state.stage:
                self.state.stage, self.state.stage_step = index, 0
            optimizer, scheduler = self.make_optimizer(stage)
            if checkpoint and checkpoint["state"]["stage"] == index:
                optimizer.load_state_dict(checkpoint["optimizer"])
                scheduler.load_state_dict(checkpoint["scheduler"])
                self.scaler.load_state_dict(checkpoint["scaler"])
                set_rng_state(checkpoint["rng"])
            self.run_stage(stage, optimizer, scheduler)
        if self.is_main and self.state.best_step < 0:  # no validation data: the final model is "best"
            self.save_best()
        return self.state

    # -- the run folder -------------------------------------------------------------------------
    def open_run_folder(self, resume: bool, overwrite: bool) -> dict | None:
        """Check ``out`` before any work; return the checkpoint to resume from (or None)."""
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"--out {self.out} is a file; name a folder for the run")
        if self.is_main:  # a folder we cannot write to fails now, not at the first checkpoint
            self.out.mkdir(parents=True, exist_ok=True)
            if not os.access(self.out, os.W_OK):
                raise PermissionError(f"--out {self.out} is not writable; choose a folder you can write to")
        for folder in (self.out, self.out / "best", self.out / "best" / "adapter"):
            if self.is_main:
                remove_stale_temporaries(folder)  # left by writes a kill interrupted
        if resume:
            return load_checkpoint(self.out / "checkpoint_last.pt")
        found = [name for name in RUN_FILES if (self.out / name).exists()]
        if found and not overwrite:
            raise FileExistsError(f"--out {self.out} already holds a training run ({', '.join(found)}); pass "
                                  "--resume to continue it, --overwrite to replace it, or choose a new --out")
        if self.distributed:
            dist.barrier()  # every rank has looked before rank 0 deletes or writes anything
        if found and self.is_main:
            import shutil
            for name in found:
                path = self.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None

    def check_resumable(self, checkpoint: dict) -> None:
        """The checkpoint must come from this recipe and this model, or resuming silently mixes runs."""
        saved, now = checkpoint.get("config", {}), self.cfg.to_dict()
        try:  # a checkpoint from before the adapter section: compare its options in today's form
            saved = TrainConfig.from_dict(saved, warn=False).to_dict()
        except (ValueError, TypeError):
            pass  # options this version cannot read: reported as they are below
        changed = [f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                   if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]
        if changed:
            raise CheckpointError(f"cannot --resume {self.out}: the options differ from the run's ("
                                  + "; ".join(changed) + "). Resume with the same options, or start afresh "
                                  "with --overwrite or a new --out")
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        stored = {k: tuple(v.shape) for k, v in checkpoint["model"].items()}
        differ = sorted(k for k in set(expected) | set(stored) if expected.get(k) != stored.get(k))
        if differ:
            raise CheckpointError(f"cannot --resume {self.out}: its model differs from this one in {len(differ)} "
                                  f"weights (e.g. {differ[:3]}); resume with the same --family / --model")

    def drop_metrics_after(self, step: int) -> None:
        """Rows logged after the checkpoint are logged again by the resumed run: keep one copy."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        def row_step(line: str) -> int:
            row = json.loads(line)
            return row["step"] if "step" in row else row.get("eval", {}).get("step", 0)
        kept = [line for line in path.read_text().splitlines() if line.strip() and row_step(line) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def make_optimizer(self, stage: Stage):
        from transformers import get_cosine_schedule_with_warmup
        params, adapter_ids = set_trainable(self.model, stage, self.cfg.lora_rank > 0)
        adapter_lr = stage.lr if stage.adapter_only or self.cfg.adapter_lr is None else self.cfg.adapter_lr
        groups = [{"params": [p for p in params if id(p) not in adapter_ids], "lr": stage.lr},
                  {"params": [p for p in params if id(p) in adapter_ids], "lr": adapter_lr}]
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, betas=self.cfg.betas, weight_decay=self.cfg.weight_decay)
        warmup = min(self.cfg.warmup_steps, max(stage.steps // 10, 1))
        return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, stage.steps)

    def run_stage(self, stage: Stage, optimizer, scheduler) -> None:
        objective = self.objective
        if self.distributed:
            objective = nn.parallel.DistributedDataParallel(self.objective, find_unused_parameters=True)
        text_frozen = stage.adapter_only  # stage 1: the text tower does not train
        self.model.train()
        if text_frozen and self.cfg.method != "clip-ft":
            tags = self.train_data.all_tags()
            self.objective.fill_tag_cache(v for e in self.cfg.entities for v in tags[e])
        bar = tqdm(total=stage.steps, initial=self.state.stage_step, desc=stage.name,
                   disable=not (self.progress and self.is_main), dynamic_ncols=True)
        while self.state.stage_step < stage.steps:
            epoch, offset = divmod(self.state.stage_step, self.steps_per_epoch)
            batches = epoch_batches(len(self.train_data), self.train_data, self.cfg.batch_size,
                                    self.cfg.seed + 7919 * self.state.stage, epoch, self.rank, self.world)
            batches = batches[offset * self.cfg.grad_accum:self.batches_per_epoch]
            # Its own generator, so creating a loader never draws from the global RNG (exact resume).
            loader = DataLoader(TrainViews(self.train_data, self.transform), batch_sampler=batches,
                                collate_fn=collate, num_workers=self.cfg.num_workers,
                                generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            tic, micro = time.perf_counter(), 0
            for batch in loader:
                self.anneal_tau()
                with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                    parts = objective(batch["image"].to(self.device), batch["text"], batch["tags"], text_frozen)
                loss = parts["loss"]  # this rank's part; backward through it gives the global batch's gradient
                parts = mean_over_ranks(parts)  # the global batch's loss, the same on every rank
                if not torch.isfinite(parts["loss"]):
                    saved = (f"the last good checkpoint is {self.out / 'checkpoint_last.pt'} (step "
                             f"{self.last_checkpoint_step})" if self.last_checkpoint_step is not None else
                             "no checkpoint was written yet (--checkpoint-every N writes one every N steps)")
                    raise TrainingDiverged(f"loss became {parts['loss'].item()} at step {self.state.step} "
                                           f"({stage.name}); {saved}. Lower the learning rate or use --amp bf16.")
                self.scaler.scale(loss / self.cfg.grad_accum).backward()
                micro += 1
                if micro % self.cfg.grad_accum:
                    continue
                self.scaler.step(optimizer)
                self.scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                self.clamp_logit_scale()
                self.state.stage_step += 1
                self.state.step += 1
                seconds = time.perf_counter() - tic
                self.state.train_seconds += seconds
                rate = self.cfg.batch_size * self.cfg.grad_accum / seconds
                tic = time.perf_counter()
                self.log_step(parts, scheduler.get_last_lr()[0], rate, bar)
                end_of_epoch = self.state.stage_step % self.steps_per_epoch == 0
                done = self.state.stage_step >= stage.steps
                if (self.cfg.eval_every and self.state.step % self.cfg.eval_every == 0) or \
                        (not self.cfg.eval_every and (end_of_epoch or done)):
                    self.validate()
                if end_of_epoch or done or (self.cfg.checkpoint_every and self.state.step % self.cfg.checkpoint_every == 0):
                    self.save_checkpoint(optimizer, scheduler)
                if done or end_of_epoch:
                    break
        bar.close()

    # -- pieces --------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def anneal_tau(self) -> None:
        if self.adapter is not None:
            frac = self.state.step / max(self.total_steps - 1, 1)
            self.adapter.tau = self.cfg.tau_start + frac * (self.cfg.tau_end - self.cfg.tau_start)

    def clamp_logit_scale(self) -> None:
        scale = self.objective.backend.logit_scale
        if scale is not None:
            with torch.no_grad():
                scale.clamp_(0, math.log(100))  # CLIP's cap

    def log_step(self, parts: dict, lr: float, rate: float, bar) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss'].item():.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        if self.is_main and (self.state.step % self.cfg.log_every == 0 or self.state.step == 1):
            row = {"step": self.state.step, "stage": self.stages[self.state.stage].name, "lr": lr,
                   "images_per_s": rate, **{k: v.item() for k, v in parts.items()}}
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def validate(self) -> None:
        if self.val_data is None:
            return
        # Every rank embeds a shard of the validation catalogue; rank 0 records the score.
        metrics = evaluate(self.model, self.val_data, self.transform, self.tokenizer, (self.cfg.eval_protocol,),
                           distributed=self.distributed)
        if not self.is_main:
            self.model.train()
            dist.barrier()  # while rank 0 saves the best model
            return
        result = metrics[self.cfg.eval_protocol]
        row = {"step": self.state.step, "protocol": self.cfg.eval_protocol, **{k: v for k, v in result.items()
                                                                                 if isinstance(v, (int, float))}}
        self.state.history.append(row)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"eval": row}) + "\n")
        if result["SumR"] > self.state.best_sumr:
            self.state.best_sumr, self.state.best_step = result["SumR"], self.state.step
            self.save_best()
        self.model.train()
        if self.distributed:
            dist.barrier()

    def base_model(self) -> nn.Module:
        return unwrap_peft(self.model)

    def save_best(self) -> None:
        """The best model as a save_pretrained folder (both towers, LoRA merged, E2; ``best/adapter`` alone)."""
        from ..pretrained import save_pretrained
        save_pretrained(self.model, self.out / "best")

    def save_checkpoint(self, optimizer, scheduler) -> None:
        if not self.is_main:
            return
        atomic_torch_save({"model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                           "state": self.state.__dict__, "rng": rng_state(), "config": self.cfg.to_dict()},
                          self.out / "checkpoint_last.pt")
        self.last_checkpoint_step = self.state.step
