"""WiSE-FT on FashionSynth: what mixing a fine-tuned encoder's weights with its base gives back.

Fine-tuning on the catalogue template forgets the base's caption style, and CIReVL's queries are in
that style (cir_controls.py). For each fine-tuned encoder and each alpha, the encoder's weights become
``(1 - alpha) * base + alpha * fine-tuned`` (``e2_adapter.interpolate_weights``; E2's own modules stay
as trained) and this script reports:

    pf SumR          product-full retrieval SumR on --val-h5 (the fine-tuning task)
    probe brand      linear probes on the global image embedding (--train-h5 -> --val-h5), brand and
    probe composition  composition
    CIReVL           composed retrieval R@10 over the edited attributes, CIReVL's rewritten oracle
                     captions (the base's style) on the set in --cir
    CIReVL tuned     the same with the fine-tuning template's text as the caption ("rewritten tuned")

    python benchmarks/wise_ft.py --family open_clip --model small --image-size 64 --base runs/w/base.pt \\
        --train-h5 runs/w/data/fashionsynth_train.h5 --val-h5 runs/w/data/fashionsynth_validation.h5 \\
        --cir runs/cir-w --encoder CLIP-FT=runs/w/clip-ft-b64-s0/best --encoder E2=runs/w/e2-b64-s0/best \\
        --alphas 0 0.25 0.5 0.75 1 --json runs/wise-s0.json
    python benchmarks/wise_ft.py --aggregate runs/wise-s0.json runs/wise-s1.json

The set in --cir is one ``e2-adapter cir build --catalogue VAL_H5`` (or composed_retrieval.py
--build-from) wrote from --val-h5.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark scripts, also when imported by a test
from cir_controls import control_report, load_products  # noqa: E402

from e2_adapter.data import FashionGenH5  # noqa: E402
from e2_adapter.evaluation.embed import embed_catalogue, evaluate  # noqa: E402
from e2_adapter.evaluation.linear_probe import probe_entities  # noqa: E402
from e2_adapter.evaluation.report import mean_std_table  # noqa: E402
from e2_adapter.interpolate import interpolate_weights  # noqa: E402
from e2_adapter.loading import for_each_encoder  # noqa: E402
from integrations.cir.cli import add_encoder_flags, encoder_from_spec  # noqa: E402
from integrations.cir.fashioniq import FashionIQ  # noqa: E402
from integrations.cir.synthetic import rewriter_for  # noqa: E402

COLUMNS = ("pf SumR", "probe brand", "probe composition", "CIReVL", "CIReVL tuned")
PROBED = ("brand", "composition")


@torch.no_grad()
def measure(bundle, train: FashionGenH5, val: FashionGenH5, labels: tuple[dict, dict], cir: FashionIQ, products: dict,
            rewriter) -> dict:
    """One encoder's row (see the module doc); ``labels``: the probed tags of train and val, read once."""
    model = bundle.model.eval()
    pf = evaluate(model, val, bundle.preprocess, bundle.tokenizer, ("product-full",))["product-full"]
    tr, te = (embed_catalogue(model, c, bundle.preprocess, bundle.tokenizer, "first") for c in (train, val))
    probes = probe_entities(tr.image, labels[0], te.image, labels[1])
    queries = control_report(bundle, cir, products, rewriter)
    return {"pf SumR": pf["SumR"], **{f"probe {e}": probes[e] for e in PROBED},
            "CIReVL": queries["rewritten"]["average"]["R@10"], "CIReVL tuned": queries["rewritten tuned"]["average"]["R@10"]}


def sweep(bundle, base_state: dict, alphas, measure_fn) -> dict:
    """``{alpha: measure_fn(bundle)}`` with the bundle's weights mixed with ``base_state`` at each alpha
    (from the fine-tuned weights every time); the bundle is left fine-tuned."""
    tuned = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    rows = {}
    try:
        for alpha in alphas:
            bundle.model.load_state_dict(tuned)
            interpolate_weights(bundle.model, base_state, alpha)
            rows[f"{alpha:g}"] = measure_fn(bundle)
    finally:
        bundle.model.load_state_dict(tuned)
    return rows


def aggregate_table(runs: list[dict]) -> str:
    """Mean ± std over runs (e.g. encoder seeds), a row per encoder and alpha."""
    cells = {f"{encoder}, alpha {alpha}": [run[encoder][alpha] for run in runs]
             for encoder in runs[0] for alpha in runs[0][encoder]}
    return mean_std_table(cells, columns=list(COLUMNS), name_header="encoder")


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_encoder_flags(p)
    p.add_argument("--encoder", action="append", metavar="NAME=SPEC", help="a fine-tuned encoder; repeat to compare")
    p.add_argument("--base", help="the state dict (.pt) the encoders were fine-tuned from")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--train-h5")
    p.add_argument("--val-h5")
    p.add_argument("--cir", help="a composed-retrieval set built from --val-h5")
    p.add_argument("--json", help="write the results here (after every encoder)")
    p.add_argument("--aggregate", nargs="+", metavar="JSON", help="only print mean ± std over earlier --json files")
    args = p.parse_args(argv)
    if args.aggregate:
        print(aggregate_table([json.loads(Path(path).read_text()) for path in args.aggregate]))
        return {}
    missing = [f"--{k.replace('_', '-')}" for k in ("encoder", "base", "train_h5", "val_h5", "cir") if not getattr(args, k)]
    if missing:
        p.error(f"{', '.join(missing)} required unless --aggregate is given")
    for path in (args.base, args.train_h5, args.val_h5):
        if not Path(path).is_file():
            raise SystemExit(f"{path}: no such file")
    base_state = torch.load(args.base, map_location="cpu", weights_only=True)  # tensors only: no code runs
    train, val = FashionGenH5(args.train_h5), FashionGenH5(args.val_h5)
    labels = tuple({e: tags[e] for e in PROBED} for tags in (train.all_tags(), val.all_tags()))
    cir, products, rewriter = FashionIQ(Path(args.cir)), load_products(Path(args.cir), "val", args.val_h5), rewriter_for(Path(args.cir))

    def run(name: str, spec: str) -> dict:
        rows = sweep(encoder_from_spec(spec, args), base_state, args.alphas,
                     lambda b: measure(b, train, val, labels, cir, products, rewriter))
        print(f"[{name}] " + "; ".join(f"alpha {a}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items())
                                     for a, row in rows.items()), flush=True)
        return rows

    results = for_each_encoder(args.encoder, run, args.json)
    print(aggregate_table([results]))
    return results


if __name__ == "__main__":
    main()
