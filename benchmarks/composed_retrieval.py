"""Composed retrieval with two (or more) encoders, side by side, per edited attribute.

Runs CIReVL (training-free, oracle or model captions + rule rewriter) and Pic2Word (a mapping network
trained per encoder on catalogue images, towers frozen) on a synthetic composed-retrieval set and
prints R@10 / R@50 per edited attribute (colour, brand, fabric, sub-category) as a markdown table.

    python benchmarks/composed_retrieval.py \\
        --data data/cir --train-h5 data/fashionsynth_train.h5 \\
        --family open_clip --model ViT-B-32 --pretrained openai \\
        --encoder CLIP-FT=runs/clipft/best --encoder E2=runs/e2/best

    # one run per pair of encoders (e.g. per training seed), then mean ± std over the runs:
    python benchmarks/composed_retrieval.py --aggregate runs/cir/s0.json runs/cir/s1.json runs/cir/s2.json

    # build the set first from a FashionSynth / FashionGen validation file:
    python benchmarks/composed_retrieval.py --build-from data/fashionsynth_validation.h5 --data data/cir ...

An encoder is NAME=SPEC with SPEC: ``base`` (the base model flags), ``module:function`` (a factory
returning a ClipBundle or (model, tokenizer, preprocess)), a trainer's best/ folder, an E2 adapter
folder, or a .pt state dict. From Python, call ``run_benchmark`` with ready-made bundles.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from e2_adapter.loading import split_named_spec
from integrations.cir.cirevl import CaptionStore, evaluate_cirevl, load_captions
from integrations.cir.cli import add_encoder_flags, encoder_from_spec, import_object
from integrations.cir.fashioniq import DEFAULT_KS, FashionIQ, markdown_table
from integrations.cir.pic2word import PseudoWordMapper, evaluate_pic2word, train_encoder_mapper
from integrations.cir.synthetic import build_synthetic_cir, rewriter_for


def run_benchmark(encoders: dict, data: str | Path, *, split: str = "val", methods=("cirevl", "pic2word"),
                  train_source=None, mappers: Optional[dict] = None, captions: Optional[dict] = None,
                  captioner=None, mapper_steps: int = 1000, batch_size: int = 256, seed: int = 0,
                  cache_dir: Optional[str | Path] = None, log=print) -> dict:
    """``{encoder name: {method: report}}`` for ClipBundles in ``encoders``.

    ``train_source``: a FashionGen-layout h5 path or a ``FashionIQ`` split whose images train the
    Pic2Word mappers (default: the evaluation images themselves, labels unused); ``mappers`` maps
    encoder names to ready mapper folders instead. ``captions`` default to the set's oracle captions.
    """
    dataset = FashionIQ(data, split)
    if captions is None and captioner is None:
        captions = load_captions(Path(data) / f"reference_captions.{split}.json")
    rewriter = rewriter_for(data)
    results = {}
    for name, bundle in encoders.items():
        bundle.model.eval()
        results[name] = {}
        if "cirevl" in methods:
            start = time.time()
            store = CaptionStore(captions, captioner)
            results[name]["cirevl"], _ = evaluate_cirevl(bundle.model, bundle.tokenizer, bundle.preprocess, dataset,
                                                         store, rewriter, cache_dir=cache_dir)
            log(f"[{name}] cirevl done in {time.time() - start:.0f}s")
        if "pic2word" in methods:
            start = time.time()
            if mappers and name in mappers:
                mapper = PseudoWordMapper.load(mappers[name])
            else:
                mapper = train_encoder_mapper(bundle, train_source or dataset, mapper_steps, batch_size, seed,
                                              cache_dir)
            results[name]["pic2word"] = evaluate_pic2word(bundle.model, bundle.tokenizer, bundle.preprocess,
                                                          dataset, mapper, cache_dir=cache_dir)
            log(f"[{name}] pic2word done in {time.time() - start:.0f}s")
    return results


def side_by_side(results: dict, ks=DEFAULT_KS) -> str:
    """One markdown table per method, encoders side by side, one row per edited attribute."""
    methods = list(dict.fromkeys(m for per in results.values() for m in per))
    return "\n\n".join(f"**{method}**\n\n" + markdown_table(
        {name: per[method] for name, per in results.items() if method in per}, ks, row_header="edited attribute")
        for method in methods)


def mean_std_side_by_side(runs: list[dict], ks=DEFAULT_KS) -> str:
    """Like ``side_by_side`` for several runs (e.g. one per encoder training seed): mean ± std per cell."""
    import numpy as np
    methods = list(dict.fromkeys(m for run in runs for per in run.values() for m in per))
    tables = []
    for method in methods:
        names = [n for n in runs[0] if method in runs[0][n]]
        rows = list(dict.fromkeys(r for run in runs for n in names for r in run[n][method] if r != "average"))
        rows.append("average")
        head = ["edited attribute"] + [f"{n} R@{k}" for n in names for k in ks]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in rows:
            cells = [row]
            for n in names:
                for k in ks:
                    values = [run[n][method][row][f"R@{k}"] for run in runs]
                    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                    cells.append(f"{np.mean(values):.1f} ± {std:.1f}")
            lines.append("| " + " | ".join(cells) + " |")
        tables.append(f"**{method}** (mean ± std over {len(runs)} runs)\n\n" + "\n".join(lines))
    return "\n\n".join(tables)


def main(argv: Optional[list[str]] = None) -> dict:

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_encoder_flags(p)
    p.add_argument("--encoder", action="append", metavar="NAME=SPEC",
                   help="repeat for each encoder to compare (e.g. CLIP-FT=runs/clipft/best E2=runs/e2/best)")
    p.add_argument("--data", help="synthetic set (FashionIQ layout)")
    p.add_argument("--aggregate", nargs="+", metavar="JSON", help="only print mean ± std over earlier runs' --json files")
    p.add_argument("--build-from", help="first build the set from this FashionGen-layout h5")
    p.add_argument("--per-attribute", type=int, default=200)
    p.add_argument("--split", default="val")
    p.add_argument("--methods", default="cirevl,pic2word")
    p.add_argument("--train-h5", help="images for the Pic2Word mappers (default: the evaluation images)")
    p.add_argument("--mapper", action="append", default=[], metavar="NAME=DIR", help="a trained mapper per encoder")
    p.add_argument("--mapper-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--captioner", help="module:function returning a captioner (default: oracle captions)")
    p.add_argument("--cache", help="folder for cached embeddings")
    p.add_argument("--json", help="write all results here")
    args = p.parse_args(argv)
    if args.aggregate:
        print(mean_std_side_by_side([json.loads(Path(path).read_text()) for path in args.aggregate]))
        return {}
    if not args.encoder or not args.data:
        p.error("--encoder (at least one) and --data are required unless --aggregate is given")

    if args.build_from:
        build_synthetic_cir(args.build_from, args.data, split=args.split, per_attribute=args.per_attribute,
                            seed=args.seed)
    encoders = {}
    for item in args.encoder:
        name, spec = split_named_spec(item)
        encoders[name] = encoder_from_spec(spec, args)
    mappers = dict(item.split("=", 1) for item in args.mapper)
    torch.manual_seed(args.seed)
    results = run_benchmark(encoders, args.data, split=args.split, methods=tuple(args.methods.split(",")),
                            train_source=args.train_h5, mappers=mappers,
                            captioner=import_object(args.captioner)() if args.captioner else None,
                            mapper_steps=args.mapper_steps, batch_size=args.batch_size, seed=args.seed,
                            cache_dir=args.cache, log=lambda msg: print(msg, file=sys.stderr))
    print(side_by_side(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
