"""Training step time of E2 against CLIP-FT, measured in the same run on the same batch.

    python benchmarks/step_time.py --model demo --batch 64 --repeats 10

Both use the trainer's own objective (ContrastiveObjective) and AdamW over all parameters (stage 2);
E2 also encodes the batch's distinct tag values through the text tower; ``clip-ft-tags`` (tag losses
on CLS, no selection tokens) shows how much of E2's extra time that is. Prints the median step times
and their ratios to CLIP-FT.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from e2_adapter.data import FashionGenH5, write_fashionsynth
from e2_adapter.data.datasets import TrainViews, collate
from e2_adapter.training.config import TrainConfig
from e2_adapter.training.trainer import ContrastiveObjective, prepare_model
from e2_adapter.zoo import create_clip


class Stepper:
    """One method's model, objective and optimizer; ``step()`` times one full training step."""

    def __init__(self, method: str, model_name: str, batch: dict, stage1: bool):
        bundle = create_clip("open_clip", model_name, seed=0)
        cfg = TrainConfig(method=method)
        self.model = prepare_model(bundle.model, cfg, "open_clip").train()
        self.objective = ContrastiveObjective(self.model, cfg, bundle.tokenizer)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-5)
        self.batch, self.stage1 = batch, stage1

    def step(self) -> float:
        tic = time.perf_counter()
        b = self.batch
        loss = self.objective(b["image"], b["text"], b["tags"], text_frozen=self.stage1)["loss"]
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return time.perf_counter() - tic


def interleaved_step_times(steppers: dict, repeats: int) -> dict[str, list[float]]:
    """Alternate the methods step by step, so a change in the machine's load hits both alike."""
    for s in steppers.values():  # warm-up
        s.step()
    times = {name: [] for name in steppers}
    for _ in range(repeats):
        for name, s in steppers.items():
            times[name].append(s.step())
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=["clip-ft", "clip-ft-tags", "e2"],
                   help="clip-ft-tags separates the cost of encoding tag texts from that of E2's tokens")
    p.add_argument("--out", default="/tmp/e2_step_time")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = create_clip("open_clip", args.model).image_size
    train, _ = write_fashionsynth(args.out, products=args.batch, val_products=2, image_size=max(size, 32))
    bundle = create_clip("open_clip", args.model)
    data = FashionGenH5(train)
    batch = collate([TrainViews(data, bundle.preprocess)[(i, 0)] for i in range(args.batch)])
    times = interleaved_step_times({m: Stepper(m, args.model, batch, stage1=False) for m in dict.fromkeys(["clip-ft", *args.methods])},
                                   args.repeats)
    base = statistics.median(times["clip-ft"])
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"model {args.model}, batch {args.batch}, median of {args.repeats} interleaved steps")
    print("| method | step ms | ratio of medians | median paired ratio |\n|---|---:|---:|---:|")
    for method, t in times.items():
        paired = statistics.median(a / b for a, b in zip(t, times["clip-ft"]))
        print(f"| {method} | {1000 * statistics.median(t):.0f} | {statistics.median(t) / base:.2f} | {paired:.2f} |")

if __name__ == "__main__":
    main()
