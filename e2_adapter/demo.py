"""``e2-adapter demo``: the whole story on FashionSynth, on a CPU, in minutes.

1. write FashionSynth (FashionGen's schema, procedurally drawn products);
2. pre-train a small CLIP on coarse captions that name only colour, garment and fabric (as web
   captions do), so fine-tuning starts from a model that has never been told about brands or seasons;
3. fine-tune it twice from the same weights with the same data, steps and learning rates: CLIP-FT
   (global loss) and E2 (global + region losses, selection tokens and fusion blocks), side by side
   in one process each where there are two cores;
4. evaluate both (product-full, sample-100, per-entity linear probes) and write the table, a bar
   chart, selection maps and the E2 adapter into the output folder.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch

from .data import FashionGenH5, SynthSpec
from .evaluation.embed import evaluate, linear_probe_entities
from .evaluation.report import results_to_markdown, save_json
from .experiments import SMALL_ENTITIES, Setting, base_model, finetune_config, prepare
from .training.trainer import Trainer
from .visualize import save_selection_figure, selection_hit_rate

# The demo's world is the benchmark's calibrated one (calD: 8-px patches, 12 brands, logo x3,
# label x2), whose tower can read the logo, with its 600-step coarse-caption base; only the
# fine-tuning is shorter than the benchmark's 1,000 steps so the whole run fits in minutes.
FULL = Setting(data=SynthSpec(val_products=400, brands=12, logo_scale=3, label_scale=2), model="small")
FULL_STEPS = 300
QUICK = replace(Setting(), data=replace(Setting().data, products=200, val_products=100), pretrain_steps=20, model="demo")
QUICK_STEPS = 20
METHODS = ("clip-ft", "e2")


def run(args) -> dict:
    setting, steps = (QUICK, QUICK_STEPS) if args.quick else (FULL, FULL_STEPS)
    steps = steps if getattr(args, "steps", None) is None else args.steps
    workers = getattr(args, "workers", None)
    workers = min(len(METHODS), os.cpu_count() or 1) if workers is None else workers
    if workers < 1 or steps < 1:  # checked before minutes of pre-training, not after
        raise SystemExit(f"--workers and --steps must be at least 1 (got {workers}, {steps})")
    setting = replace(setting, data=replace(setting.data, seed=args.seed))
    batch = 32 if args.quick else 64
    out = Path(args.out)
    print(f"[1/4] FashionSynth -> {out / 'data'}; [2/4] pre-training a plain CLIP on coarse captions "
          f"({setting.pretrain_steps} steps, cached in {out / 'base.pt'})")
    prepared = prepare(setting, out)

    print(f"[3/4] fine-tuning {' and '.join(METHODS)} from the same base ({steps} steps each, "
          f"{workers} at a time)")
    jobs = [(setting, prepared, method, steps, args.seed, batch, out, workers) for method in METHODS]
    if workers > 1:
        # One process per method: two small models on two cores train faster side by side than one
        # after the other with two intra-op threads each.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            results = dict(zip(METHODS, pool.map(finetune_and_evaluate, jobs)))
    else:
        results = dict(zip(METHODS, map(finetune_and_evaluate, jobs)))

    print("[4/4] report")
    from .pretrained import from_pretrained
    e2_bundle, baseline = (from_pretrained(out / method / "final") for method in ("e2", "clip-ft"))
    e2_model = e2_bundle.model
    val = FashionGenH5(prepared[1])
    n = min(200, len(val))
    images = torch.stack([e2_bundle.preprocess(val.load_image(p, 0)) for p in range(n)])
    boxes, frame = [val.regions(p, 0) for p in range(n)], val.load_image(0, 0).size  # boxes in stored pixels
    table = (setting.describe() + f", {steps} fine-tuning steps per method\n\n" + report(results) + "\n\n"
             + hit_rates(e2_model, images, boxes, frame))
    print(table)
    (out / "results.md").write_text(table + "\n")
    save_json(out / "results.json", results)
    bar_chart(results, out / "metrics.png")
    save_selection_figure(e2_model, images[:6], out / "selections.png", baseline=baseline.model,
                          boxes=boxes[:6], box_frame=frame)
    print(f"wrote {out / 'results.md'}, {out / 'metrics.png'}, {out / 'selections.png'}, adapter in {out / 'e2' / 'best' / 'adapter'}")
    return results


def finetune_and_evaluate(job: tuple) -> dict:
    """One method's fine-tuning from the base, its evaluation, and its final model saved beside its
    run (``<out>/<method>/final``) for the report; a top-level function so a spawned process can run it."""
    from .pretrained import save_pretrained
    setting, (train_path, val_path, base), method, steps, seed, batch, out, workers = job
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    train, val = FashionGenH5(train_path), FashionGenH5(val_path)
    bundle = base_model(setting, base)
    trainer = Trainer(bundle.model, bundle.tokenizer, bundle.preprocess, train, val,
                      finetune_config(method, steps, seed, batch), out / method, "open_clip")
    trainer.fit(overwrite=True)  # a rerun of the demo replaces its runs
    model = trainer.model.eval()
    save_pretrained(model, out / method / "final")
    metrics = evaluate(model, val, bundle.preprocess, bundle.tokenizer, ("product-full", "sample-100"))
    probe = linear_probe_entities(model, train, val, bundle.preprocess, bundle.tokenizer)
    return {"metrics": metrics, "probe": probe, "curve": trainer.state.history}


def report(results: dict) -> str:
    rows = {}
    for method, r in results.items():
        row = {}
        for protocol in ("product-full", "sample-100"):
            m = r["metrics"][protocol]
            row.update({f"{protocol} t2i R@1": m["t2i_R1"], f"{protocol} i2t R@1": m["i2t_R1"],
                        f"{protocol} SumR": m["SumR"]})
        row.update({f"probe {e}": acc for e, acc in r["probe"].items()})
        rows[method] = row
    return results_to_markdown(rows, name_header="method")


def hit_rates(model, images, boxes, frame) -> str:
    """How often E2's brand and season tokens pick a patch on the logo / label, against chance."""
    rates = selection_hit_rate(model, images, boxes, frame)
    lines = []
    for entity in SMALL_ENTITIES:
        if entity in rates:
            r = rates[entity]
            blocks = ", ".join(f"{100 * v:.1f}% in fusion block {k}" for k, v in r.items() if k != "chance")
            lines.append(f"- E2's {entity} tokens pick a patch on the {entity} region {blocks} "
                         f"(picks at random: {100 * r['chance']:.1f}%)")
    return "\n".join(lines)


def bar_chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [("product-full", "t2i_R1"), ("product-full", "i2t_R1"), ("sample-100", "t2i_R1"), ("sample-100", "i2t_R1")]
    probes = sorted(next(iter(results.values()))["probe"])
    labels = [f"{p}\n{k}" for p, k in keys] + [f"probe\n{e}" for e in probes]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.4
    for i, (method, r) in enumerate(results.items()):
        values = [r["metrics"][p][k] for p, k in keys] + [r["probe"][e] for e in probes]
        ax.bar([x + i * width for x in range(len(values))], values, width, label=method)
    ax.set_xticks([x + width / 2 for x in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel("%")
    ax.legend()
    ax.set_title("FashionSynth validation: CLIP-FT vs E2 (same start, data and steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
