"""FashionSynth benchmark: CLIP-FT vs E2, the paper's ablations, a batch-size sweep, over seeds.

Every run starts from the same coarse-caption pre-trained CLIP (the demo's, cached in --out) and gets
the same data, steps, batch, schedule and backbone learning rate (the demo's fine-tuning recipe,
e2_adapter/recipes/fashionsynth_finetune.json; the variants are fashionsynth_variants.json there);
runs differ only in the method/ablation. Prints mean ± std per cell (markdown) and writes JSON.

    python benchmarks/fashionsynth.py --out runs/bench --seeds 0 1 2 --steps 600
    python benchmarks/fashionsynth.py --variants clip-ft e2 --batch-sizes 32 64     # batch sweep
    python benchmarks/fashionsynth.py --merge runs/bench-a runs/bench-b --out runs/bench  # join parallel runs
    python benchmarks/fashionsynth.py --out runs/world --prepare-only [setting flags]  # data + base only
    python benchmarks/fashionsynth.py --figures runs/bench-a runs/bench-b --out runs/figs [setting flags]

For wrapped (E2) models it also measures where the selection tokens look: the share of each entity's
picks per fusion block that land on the entity's drawn FashionSynth box, next to the chance level
(``hit`` columns), and a linear probe on each entity's own region embedding (``region probe``), and
draws the picks on the first validation products with the true brand / season boxes dashed
(``selections.png`` in the run's folder; ``--figures`` draws them for earlier runs' ``best`` checkpoints).
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from e2_adapter.data import FashionGenH5
from e2_adapter.experiments import (SMALL_ENTITIES, Setting, add_setting_flags, base_model, default_batch,
                                    finetune_config, finetune_variants, prepare, setting_from_args)
from e2_adapter.evaluation.embed import CatalogueEmbeddings, embed_catalogue, evaluate
from e2_adapter.evaluation.linear_probe import probe_entities
from e2_adapter.evaluation.report import mean_std_table, save_json
from e2_adapter.training.trainer import Trainer
from e2_adapter.pretrained import from_pretrained
from e2_adapter.visualize import save_selection_figure, selection_hit_rate
from e2_adapter.wrap import get_adapter, is_wrapped

HIT_IMAGES = 200
FIGURE_IMAGES = 6
DEFAULT_BATCH = default_batch()  # the recipe's (the demo's); runs at other sizes are named "variant (batch N)"

# name -> TrainConfig overrides of the fine-tuning recipe (method, adapter preset, loss weights), in run
# order; the values live in e2_adapter/recipes/fashionsynth_variants.json.
VARIANTS = finetune_variants()


def run_one(variant: str, seed: int, steps: int, batch: int, setting: Setting, data: tuple[Path, Path], base: Path,
            out: Path) -> dict:
    overrides = dict(VARIANTS[variant])
    cfg = finetune_config(overrides.pop("method"), steps, seed, batch, **overrides)
    bundle = base_model(setting, base)
    train, val = FashionGenH5(data[0]), FashionGenH5(data[1])
    trainer = Trainer(bundle.model, bundle.tokenizer, bundle.preprocess, train, val, cfg,
                      out / f"{variant}-b{batch}-s{seed}", "open_clip", progress=False)
    # A run a stopped session left half done continues from its last checkpoint.
    resume = (trainer.out / "checkpoint_last.pt").is_file()
    trainer.fit(resume=resume, overwrite=not resume)
    model = trainer.model.eval()  # the final model: equal steps for every variant
    metrics = evaluate(model, val, bundle.preprocess, bundle.tokenizer, ("product-full", "sample-100"))
    # One pass over each split serves the global probes and (wrapped models) the region probes.
    tr, te = (embed_catalogue(model, c, bundle.preprocess, bundle.tokenizer, "first", regions=True)
              for c in (train, val))
    probe = probe_entities(tr.image, train.all_tags(), te.image, val.all_tags())
    row = {"pf SumR": metrics["product-full"]["SumR"], "pf t2i R@1": metrics["product-full"]["t2i_R1"],
           "pf i2t R@1": metrics["product-full"]["i2t_R1"], "s100 SumR": metrics["sample-100"]["SumR"],
           "s100 t2i R@1": metrics["sample-100"]["t2i_R1"], "s100 i2t R@1": metrics["sample-100"]["i2t_R1"],
           **{f"probe {e}": v for e, v in probe.items()}}
    # training wall clock, the sessions before a resume included (shared machines: read with the load in mind)
    row["seconds"] = trainer.state.train_seconds
    if is_wrapped(model):
        row.update(selection_diagnostics(model, bundle.preprocess, train, val, tr, te))
        selection_figure(model, bundle.preprocess, val, trainer.out / "selections.png")
    return {"row": row, "curve": trainer.state.history}


def selection_figure(model, preprocess, val: FashionGenH5, path: Path) -> Path | None:
    """The picks of every fusion block on the first validation products, their true boxes dashed
    (None for an adapter without fusion blocks, the no-fusion ablation: it picks nothing to draw)."""
    if not get_adapter(model).fusion_after:
        return None
    n = min(FIGURE_IMAGES, len(val))
    images = torch.stack([preprocess(val.load_image(p, 0)) for p in range(n)])
    titles = [" / ".join(v for e, v in val.tags(p).items() if e in SMALL_ENTITIES) for p in range(n)]
    return save_selection_figure(model, images, path, per_fusion=True, titles=titles,
                                 boxes=[val.regions(p, 0) for p in range(n)], box_frame=val.load_image(0, 0).size)


def figures(sources: list[Path], val_path: Path, out: Path) -> None:
    """``selection_figure`` for every wrapped run's ``best`` checkpoint in the ``sources`` folders."""
    val = FashionGenH5(val_path)
    out.mkdir(parents=True, exist_ok=True)
    for source in sources:
        for best in sorted(Path(source).glob("*/best")):
            bundle = from_pretrained(best)
            path = None if not is_wrapped(bundle.model) else selection_figure(
                bundle.model, bundle.preprocess, val, out / f"{Path(source).name}-{best.parent.name}.png")
            if path is not None:
                print(f"wrote {path}", flush=True)


def selection_diagnostics(model, preprocess, train: FashionGenH5, val: FashionGenH5,
                          tr: CatalogueEmbeddings, te: CatalogueEmbeddings) -> dict:
    """Hit rate of the small entities' picks on their drawn boxes, and probes on their region embeddings
    (``tr`` / ``te``: the splits' embeddings with regions)."""
    n = min(HIT_IMAGES, len(val))
    images = torch.stack([preprocess(val.load_image(p, 0)) for p in range(n)])
    rates = selection_hit_rate(model, images, [val.regions(p, 0) for p in range(n)],
                               val.load_image(0, 0).size)
    out = {}
    for e in SMALL_ENTITIES:
        if e not in rates:
            continue
        out.update({f"hit {e} f{k}": 100 * v for k, v in rates[e].items() if k != "chance"})
        out[f"hit {e} chance"] = 100 * rates[e]["chance"]
    train_tags, val_tags = train.all_tags(), val.all_tags()
    for e in SMALL_ENTITIES:
        if e in te.regions:
            acc = probe_entities(tr.regions[e], {e: train_tags[e]}, te.regions[e], {e: val_tags[e]})
            out[f"region probe {e}"] = acc[e]
    return out


def load_finished(out: Path, steps: int) -> tuple[dict, dict, list]:
    """The runs an earlier invocation of the same command finished (so a stopped benchmark resumes)."""
    path = out / "results.json"
    if not path.is_file():
        return {}, {}, []
    data = json.loads(path.read_text())
    if data.get("steps") != steps or "done" not in data:
        raise SystemExit(f"{out} holds results of another run (steps {data.get('steps')}); use a new --out")
    return data["runs"], data["curves"], data["done"]


def write_report(out: Path, runs: dict, curves: dict, header: str, done: list | None = None,
                 steps: int | None = None) -> None:
    """results.md: retrieval/probe table for every variant, and the selection diagnostics for E2's."""
    main_cols = [c for c in next(iter(runs.values()))[0] if not c.startswith(("hit ", "region probe"))]
    table = mean_std_table(runs, columns=main_cols, name_header="variant")
    wrapped = {k: v for k, v in runs.items() if any(c.startswith("hit ") for c in v[0])}
    text = header + "\n\n" + table + "\n"
    if wrapped:
        diag_cols = sorted({c for v in wrapped.values() for c in v[0] if c.startswith(("hit ", "region probe"))})
        text += "\nSelection diagnostics (%):\n\n" + mean_std_table(wrapped, columns=diag_cols, name_header="variant") + "\n"
    text += "\nValidation product-full SumR during training (mean over seeds):\n\n" + curve_table(curves) + "\n"
    print(text)
    (out / "results.md").write_text(text)
    save_json(out / "results.json", {"runs": runs, "curves": curves, "header": header, "done": done, "steps": steps})


def curve_table(curves: dict) -> str:
    """Mean validation SumR at each evaluation step: shows whether the runs had converged."""
    steps = sorted({e["step"] for runs in curves.values() for run in runs for e in run})
    lines = ["| variant | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for name, runs in curves.items():
        cells = []
        for step in steps:
            values = [e["SumR"] for run in runs for e in run if e["step"] == step]
            cells.append(f"{sum(values) / len(values):.1f}" if values else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(sources: list[Path], out: Path) -> None:
    """Join the results.json of runs made in parallel (e.g. one process per core) into one report."""
    runs, curves, headers = {}, {}, []
    for src in sources:
        data = json.loads((src / "results.json").read_text())
        for name, rows in data["runs"].items():
            runs.setdefault(name, []).extend(rows)
            curves.setdefault(name, []).extend(data["curves"].get(name, []))
        headers.append(data["header"])
    out.mkdir(parents=True, exist_ok=True)
    write_report(out, runs, curves, "; ".join(dict.fromkeys(headers)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[DEFAULT_BATCH])
    add_setting_flags(p)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                   help="only join these earlier --out folders' results.json into --out")
    p.add_argument("--prepare-only", action="store_true",
                   help="only write the data and pre-train the base into --out (for later --prepared runs)")
    p.add_argument("--figures", nargs="+", type=Path, metavar="DIR",
                   help="only draw the selections of these earlier --out folders' E2 runs (their best "
                        "checkpoints) into --out, on the validation data of the setting flags / --prepared")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        return merge(args.merge, out)
    if args.threads:
        torch.set_num_threads(args.threads)
    setting = setting_from_args(args)
    if args.figures:
        return figures(args.figures, prepare(setting, args.prepared or args.figures[0], args.prepared)[1], out)
    *data, base = prepare(setting, out, args.prepared)
    if args.prepare_only:
        return print(f"prepared {out}: {setting.describe()}")
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    header = f"{setting.describe()}, {args.steps} fine-tuning steps; machine: {machine}"
    runs, curves, done = load_finished(out, args.steps)
    for batch in args.batch_sizes:
        for variant in args.variants:
            name = variant if batch == DEFAULT_BATCH else f"{variant} (batch {batch})"
            for seed in args.seeds:
                if [name, seed] in done:
                    continue
                result = run_one(variant, seed, args.steps, batch, setting, data, base, out)
                runs.setdefault(name, []).append(result["row"])
                curves.setdefault(name, []).append(result["curve"])
                done.append([name, seed])
                print(json.dumps({"variant": name, "seed": seed, **result["row"]}), flush=True)
                write_report(out, runs, curves, header, done, args.steps)  # after every run: nothing done is lost


if __name__ == "__main__":
    main()
