"""Can the benchmark's vision tower see an entity at all? A supervised ceiling for the probes.

Trains the FashionSynth benchmark's image tower (from the same coarse-caption base, same steps, batch
and learning rates as the fine-tuning runs) with plain cross-entropy on one entity's labels, then
reports validation accuracy. If even direct supervision leaves the entity near chance, neither CLIP-FT
nor E2 can be expected to encode it at this scale, and a tie between them says nothing about E2's
mechanism; if supervision reaches it, the contrastive methods are leaving it on the table.

    python benchmarks/entity_ceiling.py --out runs/bench --entities brand season --steps 1200
    python benchmarks/entity_ceiling.py --out runs/cal-l2 --model small --logo-scale 2 --label-scale 2

The setting flags (model, pre-training, every FashionSynth knob) are the fashionsynth benchmark's; runs
that share an --out share its data and base.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from e2_adapter.data import FashionGenH5
from e2_adapter.data.datasets import TrainViews, collate
from e2_adapter.experiments import Setting, add_setting_flags, base_model, prepare, setting_from_args
from e2_adapter.training.trainer import epoch_batches, pick_device


def first_view_pixels(catalogue: FashionGenH5, preprocess) -> torch.Tensor:
    return torch.stack([preprocess(catalogue.load_image(p, 0)) for p in range(len(catalogue))])


def train_ceiling(entities: tuple[str, ...], setting: Setting, base: Path, train: FashionGenH5, val: FashionGenH5,
                  steps: int, batch: int, seed: int, device: torch.device = torch.device("cpu")) -> list[dict]:
    """The image tower with one linear head per entity, trained on the sum of their cross-entropies
    (one entity: the plain supervised ceiling; several: one run serves them all)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    bundle = base_model(setting, base)
    tower = bundle.model.visual.to(device).train()
    classes = {e: sorted(set(train.all_tags()[e])) for e in entities}
    index = {e: {c: i for i, c in enumerate(classes[e])} for e in entities}
    heads = torch.nn.ModuleDict({e: torch.nn.Linear(tower.output_dim, len(classes[e])) for e in entities}).to(device)
    opt = torch.optim.AdamW([{"params": tower.parameters(), "lr": 3e-4}, {"params": heads.parameters(), "lr": 1e-3}],
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    views = TrainViews(train, bundle.preprocess)
    step, epoch = 0, 0
    while step < steps:
        for pairs in epoch_batches(len(train), train, batch, seed, epoch):
            b = collate([views[k] for k in pairs])
            features = tower(b["image"].to(device))
            losses = {e: F.cross_entropy(heads[e](features),
                                         torch.tensor([index[e][t] for t in b["tags"][e]], device=device))
                      for e in entities}
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
        epoch += 1
    tower.eval()
    with torch.no_grad():
        pixels = first_view_pixels(val, bundle.preprocess)
        features = torch.cat([tower(chunk.to(device)) for chunk in pixels.split(128)])
    seconds = round(time.perf_counter() - start, 1)
    rows = []
    for e in entities:
        pred = heads[e](features).argmax(-1).cpu()
        truth = torch.tensor([index[e].get(t, -1) for t in val.all_tags()[e]])
        rows.append({"entity": e, "trained_with": list(entities), "seed": seed,
                     "val_accuracy": 100 * (pred == truth).float().mean().item(), "chance": 100 / len(classes[e]),
                     "final_train_loss": losses[e].item(), "steps": steps, "seconds": seconds,
                     "device": str(device)})
    return rows


def calibration_table(folders: list[Path]) -> str:
    """One row per prepared setting: its knobs, the supervised ceilings, and CLIP-FT's probes and
    time per run from a fashionsynth benchmark run in the same folder (if one was made)."""
    lines = ["| setting | model | products | brands / logo colours | logo, label scale | ceiling brand | ceiling season "
             "| CLIP-FT probe brand | CLIP-FT probe season | CLIP-FT pf SumR | ceiling s/run | CLIP-FT s/run |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for folder in folders:
        setting = json.loads((folder / "setting.json").read_text())
        data = setting["data"]
        ceilings = {}
        if (folder / "ceiling.jsonl").is_file():
            for line in (folder / "ceiling.jsonl").read_text().splitlines():
                row = json.loads(line)
                ceilings.setdefault(row["entity"], []).append(row)
        ft = {}
        if (folder / "results.json").is_file():
            runs = json.loads((folder / "results.json").read_text())["runs"].get("clip-ft", [])
            ft = runs[0] if runs else {}

        def ceiling(e):
            rows = ceilings.get(e, [])
            return (f"{sum(r['val_accuracy'] for r in rows) / len(rows):.1f} (chance {rows[0]['chance']:.1f})"
                    if rows else "-")
        seconds = [r["seconds"] for rows in ceilings.values() for r in rows]
        cells = [folder.name, setting["model"], f"{data['products']}", f"{data['brands']} / {data['logo_colours']}",
                 f"{data['logo_scale']}, {data['label_scale']}", ceiling("brand"), ceiling("season"),
                 *(f"{ft[k]:.1f}" if k in ft else "-" for k in ("probe brand", "probe season", "pf SumR")),
                 f"{max(seconds):.0f}" if seconds else "-", f"{ft['seconds']:.0f}" if "seconds" in ft else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--entities", nargs="+", default=["brand", "season"])
    p.add_argument("--joint", action="store_true", help="one run with a head per entity (default: one run each)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    add_setting_flags(p)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (fp32 on any device)")
    p.add_argument("--table", nargs="+", type=Path, metavar="DIR",
                   help="only print the calibration table of these prepared folders")
    args = p.parse_args(argv)
    if args.table:
        return print(calibration_table(args.table))
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    setting = setting_from_args(args)
    train_path, val_path, base = prepare(setting, out, args.prepared)
    train, val = FashionGenH5(train_path), FashionGenH5(val_path)
    device = pick_device(args.device)
    groups = [tuple(args.entities)] if args.joint else [(e,) for e in args.entities]
    for entities in groups:
        for seed in args.seeds:
            for row in train_ceiling(entities, setting, base, train, val, args.steps, args.batch_size, seed, device):
                print(json.dumps(row), flush=True)
                with open(out / "ceiling.jsonl", "a") as f:  # kept as each run ends
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
