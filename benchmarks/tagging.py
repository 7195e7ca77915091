"""Attribute tagging from E2's region heads vs zero-shot classification from the global embedding.

    python benchmarks/tagging.py --checkpoint runs/e2/best --val data/fashionsynth_validation.h5 \
        --vocab-from data/fashionsynth_train.h5 [--max-products 400] [--json runs/tagging.json]

Both read the same labels per entity (every tag value of the training file, or the validation file's
own); region tagging scores each entity's region embedding against the bare label (the text the
region loss trained on), zero-shot classification the global embedding against the per-entity prompt
ensembles of ``e2_adapter.product.vocab``. Prints top-1 accuracy (%) per entity with chance.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from e2_adapter import from_pretrained
from e2_adapter.data import FashionGenH5
from e2_adapter.product import tagging_accuracy, vocabulary_from_catalogue


def markdown(result: dict) -> str:
    entities = list(result["chance"])
    lines = ["| method | " + " | ".join(entities) + " |", "|---|" + "---|" * len(entities)]
    for name in ("region tagging", "global zero-shot", "chance"):
        lines.append(f"| {name} | " + " | ".join(f"{result[name][e]:.1f}" for e in entities) + " |")
    return "\n".join(lines) + f"\n\n{result['products']} products, top-1 accuracy (%)."


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a save_pretrained folder of an E2 model")
    p.add_argument("--val", required=True, help="a FashionGen-schema h5 (FashionSynth validation)")
    p.add_argument("--vocab-from", help="take each entity's labels from this h5 (default: --val's own)")
    p.add_argument("--max-products", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    bundle = from_pretrained(args.checkpoint)
    val = FashionGenH5(args.val, max_products=args.max_products)
    vocab = vocabulary_from_catalogue(FashionGenH5(args.vocab_from)) if args.vocab_from else None
    result = tagging_accuracy(bundle, val, vocab, batch_size=args.batch_size)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
