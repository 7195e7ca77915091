"""FashionSynth benchmark: CLIP-FT vs E2, the paper's ablations, a batch-size sweep, over seeds.

Every run starts from the same coarse-caption pre-trained CLIP (the demo's, cached in --out) and gets
the same data, steps, batch, schedule and backbone learning rate (the demo's fine-tuning recipe);
runs differ only in the method/ablation. Prints mean ± std per cell (markdown) and writes JSON.

    python benchmarks/fashionsynth.py --out runs/bench --seeds 0 1 2 --steps 600
    python benchmarks/fashionsynth.py --variants clip-ft e2 --batch-sizes 32 64     # batch sweep
"""
from __future__ import annotations

import argparse
import json
import platform
from dataclasses import replace
from pathlib import Path

import torch

from e2_adapter.data import FashionGenH5, write_fashionsynth
from e2_adapter.demo import MODEL, finetune_config, pretrain_base
from e2_adapter.evaluation.embed import evaluate, linear_probe_entities
from e2_adapter.evaluation.report import mean_std_table, save_json
from e2_adapter.training.trainer import Trainer
from e2_adapter.zoo import create_clip

ENTITIES = ("brand", "season", "subcategory", "composition")

# name -> (method, TrainConfig overrides)
VARIANTS = {
    "clip-ft": ("clip-ft", {}),
    "e2": ("e2", {}),
    "e2-gated": ("e2", {"preset": "gated"}),
    "e2-paper-weights": ("e2", {"global_weight": 0.5, "region_weight": 0.5}),
    "e2-no-fusion": ("e2", {"fusion_after": ()}),
    "e2-no-region-loss": ("e2", {"region_weight": 0.0}),
    "clip-ft-tags": ("clip-ft-tags", {}),  # tag losses on CLS: the extra supervision without E2's tokens
    **{f"e2-without-{e}": ("e2", {"entities": tuple(x for x in ENTITIES if x != e)}) for e in ENTITIES},
}


def run_one(variant: str, seed: int, steps: int, batch: int, data: tuple[Path, Path], base: Path, out: Path) -> dict:
    method, overrides = VARIANTS[variant]
    cfg = replace(finetune_config(method, steps, seed, batch), **overrides)
    bundle = create_clip("open_clip", MODEL)
    bundle.model.load_state_dict(torch.load(base, map_location="cpu"))
    train, val = FashionGenH5(data[0]), FashionGenH5(data[1])
    trainer = Trainer(bundle.model, bundle.tokenizer, bundle.preprocess, train, val, cfg,
                      out / f"{variant}-b{batch}-s{seed}", "open_clip", progress=False)
    trainer.fit()
    model = trainer.model.eval()  # the final model: equal steps for every variant
    metrics = evaluate(model, val, bundle.preprocess, bundle.tokenizer, ("product-full", "sample-100"))
    probe = linear_probe_entities(model, train, val, bundle.preprocess, bundle.tokenizer)
    row = {"pf SumR": metrics["product-full"]["SumR"], "pf t2i R@1": metrics["product-full"]["t2i_R1"],
           "pf i2t R@1": metrics["product-full"]["i2t_R1"], "s100 SumR": metrics["sample-100"]["SumR"],
           "s100 t2i R@1": metrics["sample-100"]["t2i_R1"], "s100 i2t R@1": metrics["sample-100"]["i2t_R1"],
           **{f"probe {e}": v for e, v in probe.items()}}
    return {"row": row, "curve": trainer.state.history}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64])
    p.add_argument("--products", type=int, default=2000)
    p.add_argument("--val-products", type=int, default=400)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_fashionsynth(out / "data", products=args.products, val_products=args.val_products, seed=0, image_size=64)
    base = pretrain_base(out, data[0], args.pretrain_steps, 0, 64)
    runs: dict[str, list[dict]] = {}
    curves: dict[str, list] = {}
    for batch in args.batch_sizes:
        for variant in args.variants:
            name = variant if len(args.batch_sizes) == 1 else f"{variant} (batch {batch})"
            for seed in args.seeds:
                result = run_one(variant, seed, args.steps, batch, data, base, out)
                runs.setdefault(name, []).append(result["row"])
                curves.setdefault(name, []).append(result["curve"])
                print(json.dumps({"variant": name, "seed": seed, **result["row"]}), flush=True)
    table = mean_std_table(runs, name_header="variant")
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    header = (f"FashionSynth ({args.products} train / {args.val_products} val products, 64 px), model `{MODEL}`, "
              f"{args.steps} fine-tuning steps, seeds {args.seeds}; machine: {machine}")
    print(header)
    print(table)
    (out / "results.md").write_text(header + "\n\n" + table + "\n")
    save_json(out / "results.json", {"runs": runs, "curves": curves, "args": vars(args)})


if __name__ == "__main__":
    main()
