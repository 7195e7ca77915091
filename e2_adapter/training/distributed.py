"""Multi-GPU (or multi-process CPU) set-up for runs launched by ``torchrun``."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..losses import deduplicate


def init_distributed() -> bool:
    """Join the process group when torchrun set WORLD_SIZE > 1: nccl on GPUs, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


# --- gathering across ranks -------------------------------------------------------------------------
# Each rank scores its local rows against the rows of every rank. Gathered rows keep their gradient, so
# a rank's loss also trains the encoders of the other ranks' rows, exactly as one big batch would.


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def row_counts(n: int, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's number of local rows (the trainer's ``[rank::world]`` split can be uneven)."""
    _, world = rank_and_world()
    if world == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.long, device=device)
    counts = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(counts, mine)
    return [int(c.item()) for c in counts]


class _GatherRows(torch.autograd.Function):
    """all_gather of [n_r, ...] tensors of per-rank lengths, differentiable.

    Backward: every rank's loss read this rank's rows, so their gradient is the sum over ranks of the
    gradient each rank computed for the whole gathered tensor (an all_reduce), cut to our slice.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, counts: tuple[int, ...]):
        rank = dist.get_rank()
        ctx.counts, ctx.rank = counts, rank
        padded = rows.new_zeros((max(counts), *rows.shape[1:]))  # all_gather needs equal shapes
        padded[:rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.counts[:ctx.rank])
        return grad[start:start + ctx.counts[ctx.rank]], None


def gather_rows(rows: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's ``rows`` in rank order (with gradients); identity on one process."""
    _, world = rank_and_world()
    if world == 1:
        return rows
    counts = counts if counts is not None else row_counts(rows.shape[0], rows.device)
    return _GatherRows.apply(rows.contiguous(), tuple(counts))


def shard(n: int, distributed: bool = True) -> tuple[range, list[int]]:
    """This rank's contiguous block of n items (embedding a catalogue across ranks) and every rank's
    block length: one block on one process, or when there are fewer items than ranks (then every rank
    does all of them)."""
    rank, world = rank_and_world() if distributed else (0, 1)
    if world == 1 or n < world:
        return range(n), [n]
    bounds = [n * r // world for r in range(world + 1)]
    return range(bounds[rank], bounds[rank + 1]), [b - a for a, b in zip(bounds, bounds[1:])]


def gather_shards(local: torch.Tensor, counts: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Every rank's block from ``shard`` in rank order, on the CPU (through ``device``: nccl gathers
    CUDA tensors)."""
    if len(counts) == 1:
        return local
    return gather_rows(local.to(device), counts).cpu()


def gather_lists(items: list) -> list[list]:
    """Every rank's list (strings: tag values), in rank order. Only our own ranks' objects are unpickled."""
    _, world = rank_and_world()
    if world == 1:
        return [list(items)]
    out: list = [None] * world
    dist.all_gather_object(out, list(items))
    return out


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies averaged over ranks: the global batch's loss, for logging and the NaN check
    (every rank then sees the same value and stops together)."""
    _, world = rank_and_world()
    detached = {k: v.detach().float() for k, v in values.items()}
    if world == 1:
        return detached
    keys = sorted(detached)
    stacked = torch.stack([detached[k].reshape(()) for k in keys])
    dist.all_reduce(stacked)
    return {k: v / world for k, v in zip(keys, stacked)}


# --- tag texts of a gathered batch -------------------------------------------------------------------

@dataclass
class TagTexts:
    """The distinct tag values of the global batch, and this rank's share of encoding them.

    A value seen on several ranks is one candidate; the flat list of (entity, value) candidates is
    dealt round-robin, each rank encodes ``mine`` and ``assemble`` puts the gathered embeddings back.
    """
    values: dict[str, list[str]]   # entity -> distinct values over the global batch, first-seen order
    ids: dict[str, torch.Tensor]   # entity -> [B] each global row's value index (rows in rank order)
    mine: list[str]                # the texts this rank encodes
    counts: list[int]              # every rank's len(mine)

    def assemble(self, gathered: torch.Tensor) -> dict[str, torch.Tensor]:
        """[sum(counts), D] embeddings in rank order -> entity -> [U_e, D] in ``values`` order."""
        world = len(self.counts)
        starts = [sum(self.counts[:r]) for r in range(world)]
        total = sum(len(v) for v in self.values.values())
        order = torch.tensor([starts[j % world] + j // world for j in range(total)], dtype=torch.long,
                             device=gathered.device)
        flat = gathered[order] if world > 1 else gathered
        out, start = {}, 0
        for entity, values in self.values.items():
            out[entity] = flat[start:start + len(values)]
            start += len(values)
        return out


def plan_tag_texts(local_tags: dict[str, list[str]]) -> TagTexts:
    """Gather every rank's tag values (rank order, as ``gather_rows``) and deal out the distinct ones."""
    rank, world = rank_and_world()
    entities = list(local_tags)
    per_rank = gather_lists([local_tags[e] for e in entities])
    values, ids = {}, {}
    for i, entity in enumerate(entities):
        values[entity], ids[entity] = deduplicate([v for lists in per_rank for v in lists[i]])
    flat = [v for e in entities for v in values[e]]
    return TagTexts(values, ids, flat[rank::world], [len(flat[r::world]) for r in range(world)])
