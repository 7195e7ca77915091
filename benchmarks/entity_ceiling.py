"""Can the benchmark's vision tower see an entity at all? A supervised ceiling for the probes.

Trains the FashionSynth benchmark's image tower (from the same coarse-caption base, same steps, batch
and learning rates as the fine-tuning runs) with plain cross-entropy on one entity's labels, then
reports validation accuracy. If even direct supervision leaves the entity near chance, neither CLIP-FT
nor E2 can be expected to encode it at this scale, and a tie between them says nothing about E2's
mechanism; if supervision reaches it, the contrastive methods are leaving it on the table.

    python benchmarks/entity_ceiling.py --out runs/bench --entities brand season --steps 1200
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from e2_adapter.data import FashionGenH5, write_fashionsynth
from e2_adapter.data.datasets import TrainViews, collate
from e2_adapter.demo import MODEL, pretrain_base
from e2_adapter.training.trainer import epoch_batches
from e2_adapter.zoo import create_clip


def first_view_pixels(catalogue: FashionGenH5, preprocess) -> torch.Tensor:
    return torch.stack([preprocess(catalogue.load_image(p, 0)) for p in range(len(catalogue))])


def train_ceiling(entity: str, base: Path, train: FashionGenH5, val: FashionGenH5, steps: int, batch: int,
                  seed: int) -> dict:
    torch.manual_seed(seed)
    bundle = create_clip("open_clip", MODEL)
    bundle.model.load_state_dict(torch.load(base, map_location="cpu"))
    tower = bundle.model.visual.train()
    classes = sorted(set(train.all_tags()[entity]))
    index = {c: i for i, c in enumerate(classes)}
    head = torch.nn.Linear(tower.output_dim, len(classes))
    opt = torch.optim.AdamW([{"params": tower.parameters(), "lr": 3e-4}, {"params": head.parameters(), "lr": 1e-3}],
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    views = TrainViews(train, bundle.preprocess)
    step, epoch = 0, 0
    while step < steps:
        for pairs in epoch_batches(len(train), train, batch, seed, epoch):
            b = collate([views[k] for k in pairs])
            labels = torch.tensor([index[t] for t in b["tags"][entity]])
            loss = F.cross_entropy(head(tower(b["image"])), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    tower.eval()
    with torch.no_grad():
        pixels = first_view_pixels(val, bundle.preprocess)
        pred = torch.cat([head(tower(chunk)).argmax(-1) for chunk in pixels.split(128)])
    truth = torch.tensor([index.get(t, -1) for t in val.all_tags()[entity]])
    return {"entity": entity, "seed": seed, "val_accuracy": 100 * (pred == truth).float().mean().item(),
            "chance": 100 / len(classes), "final_train_loss": loss.item()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--entities", nargs="+", default=["brand", "season"])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    train_path, val_path = write_fashionsynth(out / "data", products=2000, val_products=400, seed=0, image_size=64)
    base = pretrain_base(out, train_path, args.pretrain_steps, 0, 64)
    train, val = FashionGenH5(train_path), FashionGenH5(val_path)
    for entity in args.entities:
        for seed in args.seeds:
            print(json.dumps(train_ceiling(entity, base, train, val, args.steps, args.batch_size, seed)), flush=True)


if __name__ == "__main__":
    main()
