"""Training step time of E2 against CLIP-FT, measured in the same run on the same batch.

    python benchmarks/step_time.py --model demo --batch 64 --repeats 10

Both use the trainer's own objective (ContrastiveObjective) and AdamW over all parameters (stage 2);
E2 also encodes the batch's distinct tag values. Prints the median step times and their ratio.
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


def step_times(method: str, model_name: str, batch: dict, repeats: int, stage1: bool) -> list[float]:
    bundle = create_clip("open_clip", model_name, seed=0)
    cfg = TrainConfig(method=method)
    model = prepare_model(bundle.model, cfg, "open_clip").train()
    objective = ContrastiveObjective(model, cfg, bundle.tokenizer)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i in range(repeats + 1):  # the first is a warm-up
        tic = time.perf_counter()
        loss = objective(batch["image"], batch["text"], batch["tags"], text_frozen=stage1)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - tic)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="/tmp/e2_step_time")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = create_clip("open_clip", args.model).image_size
    train, _ = write_fashionsynth(args.out, products=args.batch, val_products=2, image_size=max(size, 32))
    bundle = create_clip("open_clip", args.model)
    data = FashionGenH5(train)
    batch = collate([TrainViews(data, bundle.preprocess)[(i, 0)] for i in range(args.batch)])
    rows = {}
    for method in ("clip-ft", "e2"):
        rows[method] = statistics.median(step_times(method, args.model, batch, args.repeats, stage1=False))
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"model {args.model}, batch {args.batch}, median of {args.repeats}")
    print("| method | step ms | ratio to clip-ft |\n|---|---:|---:|")
    for method, t in rows.items():
        print(f"| {method} | {1000 * t:.0f} | {t / rows['clip-ft']:.2f} |")


if __name__ == "__main__":
    main()
