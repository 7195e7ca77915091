"""Controlled captioning: where an encoder's reading of a detail is lost on the way into the caption.

captioning.py trains CapDec and DeCap on text embeddings only and feeds them image embeddings. When
an encoder reads the brand better (its linear probe) but its captions name the brand no more often,
this script keeps the encoder, the data and the decoders' recipe fixed and changes one link of the
chain at a time (all on the validation products, one caption or label each):

    linear probe           no caption: a linear classifier on the image embedding, trained on the
                           training products' image embeddings (what the embedding holds)
    text probe             the same on the captions' text embeddings (what the text tower keeps of a
                           tag its caption states: all a text-only decoder can learn to write)
    nearest caption        no decoder: the training caption whose text embedding is nearest the image
                           embedding (what cross-modal similarity alone names)
    capdec                 captioning.py's CapDec (trained on noisy text embeddings), fed the image
    capdec, gap removed    the same decoder fed normalise(image - (mean image - mean text)), the means
                           over the training products (CapDec's modality offset, applied at inference)
    capdec, own text       the same decoder fed the product's own caption's text embedding (the
                           decoder's ceiling if the image landed exactly on its caption)
    capdec on images       CapDec trained on the training products' image embeddings with their captions
                           (paired, ClipCap's setting, no noise): what this decoder carries with supervision
    decap                  captioning.py's DeCap: the image projected onto the training captions' memory
    decap, gap removed     the same decoder, the image moved by the gap (as for CapDec) before the projection
    decap, unprojected     the same decoder fed the raw image embedding
    decap, own text        the same decoder fed the product's own caption's text embedding

    python benchmarks/caption_controls.py --family open_clip --model small --image-size 64 --quick \\
        --train-h5 runs/w/data/fashionsynth_train.h5 --val-h5 runs/w/data/fashionsynth_validation.h5 \\
        --encoder CLIP-FT=runs/w/clip-ft-b64-s0/best --encoder E2=runs/w/e2-b64-s0/best --json runs/capctl-s0.json
    python benchmarks/caption_controls.py --aggregate runs/capctl-s0.json runs/capctl-s1.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling benchmark scripts, also when imported by a test
from captioning import (QUICK, Settings, add_settings_flags, fit_capdec, fit_decap, named_bundle,  # noqa: E402,F401
                        resolve_capdec_lm, settings_from_flags)

from e2_adapter.evaluation.linear_probe import probe_entities  # noqa: E402
from e2_adapter.evaluation.report import mean_std_table  # noqa: E402
from e2_adapter.loading import add_model_flags, for_each_encoder  # noqa: E402
from integrations.captioning import (caption_metrics, embed_corpus_images, embed_texts,  # noqa: E402
                                     entity_accuracy, load_corpus, modality_gap, remove_gap)
from integrations.captioning.cli import spec_from_string  # noqa: E402
from integrations.captioning.data import ENTITIES  # noqa: E402

CONDITIONS = ("linear probe", "text probe", "nearest caption", "capdec", "capdec, gap removed", "capdec, own text",
              "capdec on images", "decap", "decap, gap removed", "decap, unprojected",
              "decap, own text")
CAPTION_MEASURES = ("BLEU@4", "CIDEr")
# The decoder each decoded condition uses: CapDec trained on text, CapDec trained on images, DeCap.
DECODER = {"capdec": "capdec", "capdec, gap removed": "capdec", "capdec, own text": "capdec",
           "capdec on images": "capdec on images", "decap": "decap", "decap, gap removed": "decap",
           "decap, unprojected": "decap", "decap, own text": "decap"}


def _embed_corpus(bundle, corpus) -> tuple[torch.Tensor, torch.Tensor]:
    """(image embeddings of each product's first view, text embeddings of its caption), normalised."""
    images = embed_corpus_images(bundle.model, bundle.preprocess, corpus)
    return images, embed_texts(bundle.model, bundle.tokenizer, corpus.captions)


def _column(tags: dict, products: list[str]) -> dict[str, list[str]]:
    return {e: [tags[p].get(e, "") for p in products] for e in ENTITIES}


def decoder_inputs(train_images: torch.Tensor, train_text: torch.Tensor, val_images: torch.Tensor,
                   val_text: torch.Tensor) -> dict[str, tuple[torch.Tensor, bool]]:
    """Per decoder condition: (what its decoder is fed, whether DeCap projects it onto its memory)."""
    moved = remove_gap(val_images, modality_gap(train_images, train_text))  # the gap from the training products
    return {"capdec": (val_images, False), "capdec, gap removed": (moved, False),
            "capdec, own text": (val_text, False), "capdec on images": (val_images, False),
            "decap": (val_images, True), "decap, gap removed": (moved, True),
            "decap, unprojected": (val_images, False), "decap, own text": (val_text, False)}


def control_report(bundle, train, val, settings: Settings, seed: int = 0, device: str = "cpu",
                   conditions=CONDITIONS, log: Callable[[str], None] = print) -> dict:
    """``{condition: {entity or caption measure: percent}}`` for one encoder (see the module doc)."""
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"unknown conditions {sorted(unknown)}; choose from {CONDITIONS}")
    bundle.model.to(device).eval()
    train_images, train_text = _embed_corpus(bundle, train)
    val_images, val_text = _embed_corpus(bundle, val)
    references, tags = val.references(), val.tags()
    train_labels, val_labels = _column(train.tags(), train.product_ids), _column(tags, val.product_ids)
    report: dict = {}

    def score(condition: str, captions: list[str]) -> None:
        predictions = dict(zip(val.product_ids, captions))
        metrics = caption_metrics(predictions, references, use_java=settings.use_java)
        report[condition] = {**{m: 100 * metrics[m] for m in CAPTION_MEASURES},
                             **{e: 100 * v for e, v in entity_accuracy(predictions, tags).items() if e in ENTITIES}}
        log(f"  {condition}: brand {report[condition]['brand']:.1f}, BLEU@4 {report[condition]['BLEU@4']:.1f}")

    if "linear probe" in conditions:
        report["linear probe"] = probe_entities(train_images, train_labels, val_images, val_labels, seed=seed)
    if "text probe" in conditions:
        report["text probe"] = probe_entities(train_text, train_labels, val_text, val_labels, seed=seed)
    if "nearest caption" in conditions:
        score("nearest caption", [train.captions[i] for i in (val_images @ train_text.T).argmax(dim=1).tolist()])
    start = time.time()
    inputs = decoder_inputs(train_images, train_text, val_images, val_text)
    wanted = [c for c in conditions if c in inputs]
    fits = {"capdec": lambda: fit_capdec(settings, train_text, bundle, train.captions, seed, device)[0],
            # paired: each caption conditioned on its product's image, no noise
            "capdec on images": lambda: fit_capdec(replace(settings, noise_variance=0.0), train_images, bundle,
                                                   train.captions, seed, device)[0],
            "decap": lambda: fit_decap(settings, train_text, bundle, train.captions, seed, device)[0]}
    decoders = {name: fits[name]() for name in dict.fromkeys(DECODER[c] for c in wanted)}  # each fitted once
    for condition in wanted:
        embeddings, project = inputs[condition]
        decoder = decoders[DECODER[condition]]
        if DECODER[condition] == "decap":
            score(condition, decoder.generate(embeddings, project=project))
        else:
            score(condition, decoder.generate(embeddings, method=settings.capdec_method))
    log(f"  decoders: {time.time() - start:.0f} s")
    return {c: report[c] for c in CONDITIONS if c in report}


def aggregate_table(runs: list[dict]) -> str:
    """Mean ± std over runs (e.g. encoder seeds), a row per (condition, encoder)."""
    cells = {f"{condition} [{encoder}]": [run[encoder][condition] for run in runs]
             for condition in runs[0][next(iter(runs[0]))] for encoder in runs[0]}
    return ("(%: captions naming the product's tag, or the probe's accuracy; caption measures x100)\n\n"
            + mean_std_table(cells, columns=list(CAPTION_MEASURES) + list(ENTITIES), name_header="condition [encoder]"))


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", action="append", metavar="NAME=SPEC", help="repeat for each encoder to compare")
    b = p.add_argument_group("base model (what SPECs load onto)")
    add_model_flags(b, default_model="tiny")
    b.add_argument("--encoder-seed", type=int, default=0, help="init seed of a random base model")
    p.add_argument("--train-h5")
    p.add_argument("--val-h5")
    p.add_argument("--max-val", type=int, help="caption only the first N validation products")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS, metavar="CONDITION")
    p.add_argument("--seed", type=int, default=0, help="the decoders' seed")
    add_settings_flags(p)  # captioning.py's --quick and --set
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--aggregate", nargs="+", metavar="JSON", help="only print mean ± std over earlier --json files")
    args = p.parse_args(argv)
    if args.aggregate:
        print(aggregate_table([json.loads(Path(path).read_text()) for path in args.aggregate]))
        return {}
    if not (args.encoder and args.train_h5 and args.val_h5):
        p.error("--encoder (at least one), --train-h5 and --val-h5 are required unless --aggregate is given")
    for path in (args.train_h5, args.val_h5):
        if not Path(path).is_file():
            raise SystemExit(f"{path}: no such file (a FashionGen-layout h5, e.g. a FashionSynth world's data/)")
    settings = settings_from_flags(args.quick, args.set)
    resolve_capdec_lm(settings)
    train, val = load_corpus(args.train_h5, settings.style), load_corpus(args.val_h5, settings.style, args.max_val)
    base = {"family": args.family, "model": args.model, "pretrained": args.pretrained,
            "image_size": args.image_size, "encoder_seed": args.encoder_seed}

    def run(name: str, spec: str) -> dict:
        print(f"[{name}]")
        bundle = named_bundle(spec_from_string(spec, base), args.device)
        return control_report(bundle, train, val, settings, args.seed, args.device, args.conditions)

    results = for_each_encoder(args.encoder, run, args.json)
    print(aggregate_table([results]))
    return results


if __name__ == "__main__":
    main()
