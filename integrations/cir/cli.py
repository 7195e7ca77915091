"""``e2-adapter cir``: zero-shot composed image retrieval. Thin: parse flags, call the library.

    e2-adapter cir build --catalogue data/fashionsynth_validation.h5 --out data/cir
    e2-adapter cir train --data data/fashionsynth_train.h5 --out runs/phi  [model flags]
    e2-adapter cir train --data data/fashionsynth_train.h5 --out runs/phi --objective searle  [model flags]
    e2-adapter cir eval  --data data/cir --method cirevl                    [model flags]
    e2-adapter cir eval  --data data/cir --method pic2word --mapper runs/phi [model flags]

Model flags are the main CLI's (--family, --model, --pretrained, --image-size, --encoder-seed) plus
--checkpoint (a save_pretrained folder, e.g. a trainer's best/), --adapter (an E2 adapter folder) or
--factory module:function (any code returning a ClipBundle or a (model, tokenizer, preprocess) triple).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from e2_adapter.loading import add_encoder_flags as add_library_encoder_flags
from e2_adapter.loading import import_object, load_encoder, parse_encoder_spec  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from e2_adapter.zoo import ClipBundle


# -- encoders -----------------------------------------------------------------------------------------
def add_encoder_flags(p: argparse.ArgumentParser) -> None:
    add_library_encoder_flags(p, default_model="tiny")
    p.add_argument("--seed", type=int, default=0, help="seed (sampling, training)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def encoder_from_spec(spec: str, base_args) -> "ClipBundle":  # noqa: F821
    """One encoder named on a command line, relative to the base model flags in ``base_args``
    (the forms of ``e2_adapter.loading.parse_encoder_spec``)."""
    try:
        fields = parse_encoder_spec(spec)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return load_encoder(argparse.Namespace(**{**vars(base_args), **fields}))


# -- commands -----------------------------------------------------------------------------------------
def cmd_build(args) -> dict:
    from .synthetic import build_synthetic_cir
    catalogue = args.catalogue
    if catalogue is None:
        from e2_adapter.data import write_fashionsynth
        _, catalogue = write_fashionsynth(Path(args.out) / "fashionsynth", products=1, val_products=args.fashionsynth,
                                          seed=args.seed, image_size=args.image_size)
    attributes = args.attributes.split(",") if args.attributes else None
    summary = build_synthetic_cir(catalogue, args.out, split=args.split, per_attribute=args.per_attribute,
                                  seed=args.seed, max_gallery=args.max_gallery,
                                  **({"attributes": attributes} if attributes else {}))
    print(json.dumps(summary, indent=1))
    return summary


def _training_embeddings(args, bundle) -> torch.Tensor:
    from .fashioniq import FashionIQ
    from .pic2word import embed_folder, embed_product_images
    path = Path(args.data)
    if path.is_dir():
        return embed_folder(bundle.model, bundle.preprocess, FashionIQ(path, args.split), cache_dir=args.cache)
    from e2_adapter.data import FashionGenH5
    return embed_product_images(bundle.model, bundle.preprocess, FashionGenH5(path), views=args.views,
                                cache_dir=args.cache)


def cmd_train(args) -> Path:
    from .pic2word import MapperConfig, train_mapper
    from .text_injection import token_width
    bundle = load_encoder(args)
    embeddings = _training_embeddings(args, bundle)
    prompts = args.prompts or args.objective  # each objective trains with its own method's prompts by default
    config = MapperConfig.for_style(prompts, input_dim=embeddings.shape[1], output_dim=token_width(bundle.model),
                                    hidden_dim=args.hidden_dim, hidden_layers=args.hidden_layers, dropout=args.dropout)
    every = max(1, args.steps // 10)

    def log(step, loss):
        if (step + 1) % every == 0 or step == 0:
            print(f"step {step + 1}/{args.steps} loss {loss:.4f}")
    common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                  seed=args.seed, log=log)
    record = {"images": len(embeddings), "objective": args.objective}
    if args.objective == "searle":
        from .searle import PhraseBank, train_searle
        bank = PhraseBank.load(args.concepts) if args.concepts else None
        mapper, searle = train_searle(bundle.model, bundle.tokenizer, embeddings, config, bank=bank,
                                      oti_steps=350 if args.oti_steps is None else args.oti_steps, oti_batch_size=args.oti_batch_size, **common)
        losses = searle["losses"]
        record["oti_losses"] = searle["oti_losses"]
        print("OTI loss per image batch: " + ", ".join(f"{b[0]:.4f} -> {b[-1]:.4f}" for b in searle["oti_losses"]))
    else:
        if args.concepts or args.oti_steps is not None:
            raise SystemExit("--concepts and --oti-steps belong to --objective searle")
        mapper, losses = train_mapper(bundle.model, bundle.tokenizer, embeddings, config, **common)
    out = mapper.save(args.out)
    (out / "train_log.json").write_text(json.dumps({**record, "losses": losses}))
    print(f"mapper saved to {out} (loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    return out


def cmd_eval(args) -> dict:
    from .fashioniq import FashionIQ, markdown_table
    dataset = FashionIQ(args.data, args.split, args.categories.split(",") if args.categories else None)
    bundle = load_encoder(args)
    common = dict(cache_dir=args.cache, exclude_reference=args.exclude_reference)
    extra = {}
    if args.method == "cirevl":
        from .cirevl import CaptionStore, evaluate_cirevl, load_captions
        report, composer = evaluate_cirevl(bundle.model, bundle.tokenizer, bundle.preprocess, dataset,
                                           _caption_store(args, load_captions, CaptionStore),
                                           _rewriter(args), **common)
        if args.descriptions:
            Path(args.descriptions).write_text(json.dumps(composer.log, indent=1, ensure_ascii=False))
    else:
        from .pic2word import PseudoWordMapper, evaluate_pic2word
        if not args.mapper:
            raise SystemExit("--method pic2word needs --mapper (a folder written by `cir train`)")
        mapper = PseudoWordMapper.load(args.mapper)
        report = evaluate_pic2word(bundle.model, bundle.tokenizer, bundle.preprocess, dataset, mapper, **common)
        extra["mapper"] = str(args.mapper)
    print(markdown_table({args.method: report}))
    result = {"method": args.method, "data": str(args.data), "split": args.split,
              "exclude_reference": args.exclude_reference, "results": report, **extra}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _caption_store(args, load_captions, CaptionStore):
    captioner = import_object(args.captioner)() if args.captioner else None
    captions = None
    if args.captions:
        captions = load_captions(args.captions)
    elif captioner is None:
        oracle = Path(args.data) / f"reference_captions.{args.split}.json"
        if not oracle.is_file():
            raise SystemExit("CIReVL needs reference captions: --captions FILE.json, --captioner module:function, "
                             f"or a synthetic set with {oracle.name}")
        captions = load_captions(oracle)
    return CaptionStore(captions, captioner, path=args.caption_cache)


def _rewriter(args):
    from .rewriter import LLMRewriter, RuleRewriter
    from .synthetic import rewriter_for
    if args.rewriter == "rule":
        return RuleRewriter.from_vocab(args.vocab) if args.vocab else rewriter_for(args.data)
    obj = import_object(args.rewriter)
    if args.rewriter_kind == "complete":  # obj() returns a complete(prompt) -> str client
        return LLMRewriter(obj())
    return obj()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e2-adapter cir", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="write a synthetic composed-retrieval set in FashionIQ's layout")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--catalogue", help="a FashionGen-layout h5 (FashionSynth or FashionGen)")
    src.add_argument("--fashionsynth", type=int, metavar="N", help="first write a FashionSynth catalogue of N products")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--per-attribute", type=int, default=200, help="at most this many triplets per edited attribute")
    p.add_argument("--attributes", help="comma-separated subset of colour,brand,fabric,subcategory")
    p.add_argument("--max-gallery", type=int, default=None, help="keep only the first N products")
    p.add_argument("--image-size", type=int, default=64, help="image size of a generated FashionSynth catalogue")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train", help="train a Pic2Word/SEARLE mapping network (images only, towers frozen)")
    add_encoder_flags(p)
    p.add_argument("--data", required=True, help="a FashionGen-layout h5, or a FashionIQ-layout folder")
    p.add_argument("--split", default="train", help="split of a FashionIQ-layout folder")
    p.add_argument("--views", default="first", choices=("first", "all"), help="images per h5 product")
    p.add_argument("--out", required=True, help="folder for mapper.safetensors + mapper_config.json")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--hidden-dim", type=int, default=2048)
    p.add_argument("--hidden-layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--objective", default="pic2word", choices=("pic2word", "searle"),
                   help="pic2word: contrastive loss of 'a photo of *' against the images; searle: textual "
                        "inversion per image, then phi distilled from it (integrations/cir/searle.py)")
    p.add_argument("--prompts", default=None, choices=("pic2word", "searle"),
                   help="prompts the mapper trains and queries with (default: the objective's): Pic2Word's "
                        "('a photo of *', query 'a photo of * , {c2} and {c1}') or SEARLE's ('a photo of $', "
                        "'a photo of $ that {c1} and {c2}', both caption orders averaged)")
    p.add_argument("--concepts", help="searle: concepts for the phrase regulariser: a JSON list, a JSON "
                                      "{concept: [phrases]} or a text file, one concept per line (default: "
                                      "garment words with built-in phrases)")
    p.add_argument("--oti-steps", type=int, default=None, help="searle: inversion steps per image (default 350)")
    p.add_argument("--oti-batch-size", type=int, default=32, help="searle: images inverted together")
    p.add_argument("--cache", help="folder for cached image embeddings")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="R@10 / R@50 on a FashionIQ-layout folder (FashionIQ or a synthetic set)")
    add_encoder_flags(p)
    p.add_argument("--data", required=True, help="FashionIQ-layout folder")
    p.add_argument("--method", required=True, choices=("cirevl", "pic2word"))
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--categories", help="comma-separated (default: every category found)")
    p.add_argument("--captions", help="cirevl: JSON {image name: caption} of the references")
    p.add_argument("--captioner", help="cirevl: module:function returning a captioner (list[PIL] -> list[str])")
    p.add_argument("--caption-cache", help="cirevl: JSON file caching generated captions")
    p.add_argument("--rewriter", default="rule", help="cirevl: 'rule' or module:function returning a rewriter")
    p.add_argument("--rewriter-kind", default="rewriter", choices=("rewriter", "complete"),
                   help="what --rewriter's function returns: a rewriter(caption, modification) or an LLM "
                        "complete(prompt) client")
    p.add_argument("--vocab", help="cirevl: vocabulary JSON for the rule rewriter (default DATA/vocab.json)")
    p.add_argument("--descriptions", help="cirevl: write every query's caption and rewritten description here")
    p.add_argument("--mapper", help="pic2word: folder written by `cir train`")
    p.add_argument("--cache", help="folder for cached gallery embeddings")
    p.add_argument("--exclude-reference", action="store_true",
                   help="drop the reference image from its ranking (CIRR-style; FashionIQ protocols keep it)")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv: Optional[list[str]] = None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
