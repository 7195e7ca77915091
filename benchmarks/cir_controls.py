"""Controlled queries for composed retrieval: which part of the query an encoder wins or loses on.

CIReVL ranks the gallery by the text embedding of a rewritten reference caption. When one encoder
retrieves products better from their full texts but worse from CIReVL's queries, this script keeps
the set, the gallery and the encoders fixed and changes only the query text, one part at a time:

    rewritten       CIReVL's query: the rule rewriter applied to the reference's oracle caption
    target caption  the target's own oracle caption: "{title} by {brand}, {fabric}" (no rewriter)
    title + brand   "{title} by {brand}" (no fabric)
    title + fabric  "{title}, {fabric}" (no brand)
    title           the target's title alone ("Burgundy Linen Skirt")
    name + description  the target's "{name}. {description}" (the text the set's captions come from)
    tuned text      with --catalogue: the target's text in the template the encoders were fine-tuned
                    on ("{composition}. {subcategory}. {brand}. {season}. {description}")
    rewritten tuned with --catalogue: CIReVL with the reference's tuned text as its caption

With --train-h5, Pic2Word (a mapper trained per encoder with composed_retrieval.py's recipe) runs twice:
with the set's relative captions ("has a logo of Lune Paris and is by Lune Paris instead of ...") and
with the bare target value ("Lune Paris").

It prints, per query and edited attribute, R@10 over the gallery and "beats reference": the share
of queries whose target scores above the reference image, which differs from it only in the edited
attribute (50% = the query's words for that attribute are not used).

    python benchmarks/cir_controls.py --family open_clip --model small --image-size 64 --data runs/cir \\
        --encoder CLIP-FT=runs/clipft/best --encoder E2=runs/e2/best --json runs/cir-controls-s0.json
    python benchmarks/cir_controls.py --aggregate runs/cir-controls-s0.json runs/cir-controls-s1.json

The set is one written by ``composed_retrieval.py --build-from`` (it needs ``products.{split}.json``).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from e2_adapter.loading import for_each_encoder
from integrations.cir.cirevl import ImageFeatures, encode_texts, load_captions
from integrations.cir.cli import add_encoder_flags, encoder_from_spec
from integrations.cir.fashioniq import FashionIQ, Triplet, recall_at_k, target_ranks
from integrations.cir.pic2word import Pic2Word, train_encoder_mapper
from integrations.cir.synthetic import rewriter_for, safe_image_name

# query text from (reference product, target product, modification, rewriter); products are the
# builder's products.{split}.json rows (title, brand, fabric, text, ...) with their oracle captions
QUERIES: dict[str, Callable[[dict, dict, str, Callable], str]] = {
    "rewritten": lambda ref, tgt, mod, rw: rw(ref["oracle caption"], mod),
    "target caption": lambda ref, tgt, mod, rw: tgt["oracle caption"],
    "title + brand": lambda ref, tgt, mod, rw: f"{tgt['title']} by {tgt['brand']}",
    "title + fabric": lambda ref, tgt, mod, rw: f"{tgt['title']}, {tgt['fabric']}",
    "title": lambda ref, tgt, mod, rw: tgt["title"],
    "name + description": lambda ref, tgt, mod, rw: tgt["text"],
    "tuned text": lambda ref, tgt, mod, rw: tgt["tuned text"],
    "rewritten tuned": lambda ref, tgt, mod, rw: rw(ref["tuned text"], mod),
}
NEEDS_CATALOGUE = ("tuned text", "rewritten tuned")


def load_products(root: Path, split: str, catalogue: Optional[str] = None) -> dict:
    """The set's products with their "oracle caption" (CIReVL's, from the set); with ``catalogue``
    (the h5 the set was built from) each also gets its "tuned text", the catalogue's text in the
    library's default (fine-tuning) template."""
    path = root / f"products.{split}.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: build the set with composed_retrieval.py --build-from first")
    products = json.loads(path.read_text())
    for name, caption in load_captions(root / f"reference_captions.{split}.json").items():
        products[name]["oracle caption"] = caption
    if catalogue:
        from e2_adapter.data import FashionGenH5
        h5 = FashionGenH5(catalogue)
        tuned = dict(zip((safe_image_name(i) for i in h5.product_ids()), h5.texts()))
        missing = [name for name in products if name not in tuned]
        if missing:
            raise SystemExit(f"{catalogue} lacks {len(missing)} of the set's products (e.g. {missing[:2]}); "
                             "pass the h5 the set was built from")
        for name, row in products.items():
            row["tuned text"] = tuned[name]
    return products


def value_triplets(triplets: list[Triplet], products: dict, attribute: str) -> list[Triplet]:
    """The same queries with the edit written as the target's bare value, the way the catalogue
    text states it ("Lune Paris", "100% linen", "SKIRTS", "navy"), instead of relative captions."""
    return [replace(t, captions=(products[t.target][attribute],)) for t in triplets]


@torch.no_grad()
def control_report(bundle, dataset: FashionIQ, products: dict, rewriter, mapper=None, ks=(10,)) -> dict:
    """``{query: {attribute: {"R@10": .., "beats reference": ..}}}`` for one encoder; with a Pic2Word
    ``mapper``, also Pic2Word with the set's relative captions and with the bare target value."""
    with_tuned = "tuned text" in next(iter(products.values()))
    texts = {q: f for q, f in QUERIES.items() if with_tuned or q not in NEEDS_CATALOGUE}
    bundle.model.eval()
    images = ImageFeatures.for_dataset(bundle.model, bundle.preprocess, dataset)
    pic2word = Pic2Word(bundle.model, bundle.tokenizer, mapper, images) if mapper is not None else None
    report: dict = {}
    for attribute in dataset.categories:
        triplets = [t for t in dataset.triplets(attribute) if t.target is not None]
        if not triplets:  # a small catalogue may offer no pair for an attribute
            continue
        gallery = dataset.gallery(attribute)
        index = {n: i for i, n in enumerate(gallery)}
        gallery_emb = F.normalize(images(gallery).float(), dim=-1)
        targets = torch.tensor([index[t.target] for t in triplets])
        references = torch.tensor([index[t.reference] for t in triplets])
        rows = torch.arange(len(triplets))
        queries = {name: (lambda make=make: encode_texts(bundle.model, bundle.tokenizer, [
            make(products[t.reference], products[t.target], t.modification, rewriter) for t in triplets]))
            for name, make in texts.items()}
        if pic2word is not None:
            queries["pic2word"] = lambda: pic2word.compose(triplets, dataset)
            queries["pic2word, bare value"] = lambda: pic2word.compose(
                value_triplets(triplets, products, attribute), dataset)
        for name, embed in queries.items():
            scores = F.normalize(embed().float(), dim=-1) @ gallery_emb.T
            beats = (scores[rows, targets] > scores[rows, references]).float().mean().item() * 100
            report.setdefault(name, {})[attribute] = {**recall_at_k(target_ranks(scores, targets), ks),
                                                      "beats reference": beats}
    for per in report.values():
        measures = next(iter(per.values()))
        per["average"] = {k: float(np.mean([cell[k] for cell in per.values()])) for k in measures}
    return report


def aggregate_table(runs: list[dict], measure: str) -> str:
    """Mean ± std over runs (e.g. encoder seeds) of one measure, a row per (query, encoder)."""
    encoders = list(runs[0])
    queries = list(runs[0][encoders[0]])
    attributes = list(runs[0][encoders[0]][queries[0]])
    lines = [f"**{measure}** (mean ± std over {len(runs)} runs)", "",
             "| query | encoder | " + " | ".join(attributes) + " |", "|---|---|" + "---|" * len(attributes)]
    for query in queries:
        for encoder in encoders:
            cells = []
            for a in attributes:
                values = [run[encoder][query][a][measure] for run in runs]
                std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                cells.append(f"{np.mean(values):.1f} ± {std:.1f}")
            lines.append(f"| {query} | {encoder} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_encoder_flags(p)
    p.add_argument("--encoder", action="append", metavar="NAME=SPEC", help="repeat for each encoder to compare")
    p.add_argument("--data", help="a set written by composed_retrieval.py --build-from")
    p.add_argument("--split", default="val")
    p.add_argument("--catalogue", help="the FashionGen-layout h5 the set was built from (adds the tuned-text queries)")
    p.add_argument("--train-h5", help="train a Pic2Word mapper per encoder on these images (adds the Pic2Word queries)")
    p.add_argument("--mapper-steps", type=int, default=300)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--aggregate", nargs="+", metavar="JSON", help="only print mean ± std over earlier --json files")
    args = p.parse_args(argv)
    if args.aggregate:
        runs = [json.loads(Path(path).read_text()) for path in args.aggregate]
        print(aggregate_table(runs, "R@10") + "\n\n" + aggregate_table(runs, "beats reference"))
        return {}
    if not args.encoder or not args.data:
        p.error("--encoder (at least one) and --data are required unless --aggregate is given")
    root = Path(args.data)
    dataset, products, rewriter = FashionIQ(root, args.split), load_products(root, args.split, args.catalogue), rewriter_for(root)
    torch.manual_seed(args.seed)  # once, as composed_retrieval.py does: the same mappers as its runs

    def run(name: str, spec: str) -> dict:
        bundle = encoder_from_spec(spec, args)
        mapper = None
        if args.train_h5:
            mapper = train_encoder_mapper(bundle, args.train_h5, args.mapper_steps, 256, args.seed)
        return control_report(bundle, dataset, products, rewriter, mapper)

    results = for_each_encoder(args.encoder, run, args.json)
    print(aggregate_table([results], "R@10") + "\n\n" + aggregate_table([results], "beats reference"))
    return results


if __name__ == "__main__":
    main()
