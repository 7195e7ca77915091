"""``caption train | generate | eval``: thin argument parsing over the captioning library.

    caption train capdec --train-h5 train.h5 --out runs/capdec [--adapter runs/e2]
    caption generate --decoder runs/capdec --h5 validation.h5 --out captions.jsonl
    caption train decap ... --remove-gap    # also store the modality gap; generate then removes it
    caption eval --captions captions.jsonl --h5 validation.h5 --out metrics.json

The encoder is described by flags (CLIP family, model, weights, optional E2 adapter directory).
``train`` records them in ``encoder.json`` beside the decoder and ``generate`` reuses them, so a
decoder is always run with the encoder whose text tower trained it unless told otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

from integrations.capdec import CapDec, small_gpt2_config, train_capdec
from integrations.decap import DeCap, DeCapConfig, train_decap

from e2_adapter.files import atomic_write
from e2_adapter.loading import ENCODER_FIELDS, add_encoder_flags, encoder_namespace, load_encoder, parse_encoder_spec

from .checkpoint import read_config, read_json, write_json
from .data import load_corpus, single_sentence
from .encoders import embed_corpus_images, embed_texts, resolve_encoder
from .gap import load_gap, modality_gap, remove_gap, save_gap
from .metrics import caption_metrics, entity_accuracy
from .tokenizers import ClipBPETokenizer, HFTokenizer, WordTokenizer

ENCODER_FILE = "encoder.json"
ENCODER_KEYS = ENCODER_FIELDS


# -- encoders ---------------------------------------------------------------------------------------
def _add_encoder_flags(p: argparse.ArgumentParser, defaults: bool) -> None:
    """The project's encoder flags (as in ``e2-adapter eval`` and ``cir``); ``defaults=False`` for
    generate, where None means "as recorded in encoder.json"."""
    add_encoder_flags(p.add_argument_group("encoder (recorded in encoder.json by train, reused by generate)"),
                      default_model="tiny", defaults=defaults)


def spec_from_string(text: str, base: dict) -> dict:
    """An encoder named on a command line (``NAME=SPEC`` in the benchmark), relative to ``base``: the
    forms of ``e2_adapter.loading.parse_encoder_spec``, the same as ``e2-adapter cir``."""
    return {**base, **parse_encoder_spec(text)}


def encoder_from_spec(spec: dict, device: str = "cpu"):
    """(encoder, clip tokenizer, image preprocess, name) from an encoder spec (see ``ENCODER_KEYS``),
    loaded by the library's one ``load_encoder``."""
    bundle = load_encoder(encoder_namespace(spec), device=device)
    encoder = resolve_encoder(bundle.model)  # checks it is CLIP-like
    name = spec.get("factory") or spec.get("checkpoint") or spec.get("adapter") or f"{spec['family']}:{spec['model']}"
    return encoder, bundle.tokenizer, bundle.preprocess, name


def load_captioner(directory: str | Path, map_location: str = "cpu"):
    """A saved CapDec or DeCap, whichever the directory holds."""
    kind = read_config(directory).get("kind")
    if kind == "capdec":
        return CapDec.from_pretrained(directory, map_location=map_location)
    if kind == "decap":
        return DeCap.from_pretrained(directory, map_location=map_location)
    raise ValueError(f"{directory} holds an unknown captioner kind {kind!r}")


# -- train ----------------------------------------------------------------------------------------
def _build_capdec(args, captions: list[str], embed_dim: int) -> CapDec:
    if args.tokenizer == "word" or (args.tokenizer == "auto" and args.lm == "tiny"):
        tokenizer = WordTokenizer.fit(captions)
    elif args.tokenizer == "clip_bpe":
        tokenizer = ClipBPETokenizer()
    elif args.lm == "tiny":
        tokenizer = HFTokenizer.from_pretrained("gpt2")
    else:
        tokenizer = HFTokenizer.from_pretrained(args.lm)
    lm = small_gpt2_config(tokenizer, n_positions=512) if args.lm == "tiny" else args.lm
    stop = {"auto": "." if single_sentence(captions) else None, "eos": None}.get(args.stop_token, args.stop_token)
    return CapDec.create(embed_dim, lm=lm, tokenizer=tokenizer, mapping=args.mapping,
                         prefix_length=args.prefix_length, noise_variance=args.noise_variance,
                         stop_token=stop, train_lm=not args.freeze_lm)


def cmd_train(args) -> int:
    corpus = load_corpus(args.train_h5, args.style, args.max_products)
    spec = {k: getattr(args, k) for k in ENCODER_KEYS}
    encoder, clip_tokenizer, preprocess, name = encoder_from_spec(spec, args.device)
    embeddings = embed_texts(encoder, clip_tokenizer, corpus.captions)  # once, shared by the memory bank
    if args.remove_gap:  # measured before training, so a bad image fails fast
        gap = modality_gap(embed_corpus_images(encoder, preprocess, corpus), embeddings)
    schedule = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "warmup_steps", "max_steps", "seed")}
    schedule = {k: v for k, v in schedule.items() if v is not None}
    if args.captioner == "capdec":
        model = _build_capdec(args, corpus.captions, embeddings.shape[-1]).to(args.device)
        losses = train_capdec(model, encoder, clip_tokenizer, corpus.captions, text_embeddings=embeddings,
                              encoder_name=name, log_every=args.log_every, **schedule)
    else:
        config = DeCapConfig(embeddings.shape[-1], n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                             max_caption_tokens=args.max_caption_tokens, max_tokens=args.max_tokens)
        model = DeCap.for_captions(config, corpus.captions) if args.compact_vocab else DeCap(config)
        model = model.to(args.device)
        losses = train_decap(model, encoder, clip_tokenizer, corpus.captions, text_embeddings=embeddings,
                             memory_size=args.memory_size, encoder_name=name, log_every=args.log_every, **schedule)
    model.save_pretrained(args.out)
    write_json(Path(args.out) / ENCODER_FILE, spec)
    if args.remove_gap:
        save_gap(args.out, gap)
    write_json(Path(args.out) / "train_log.json", {"style": args.style, "captions": len(corpus),
                                                   "losses": losses})
    print(f"trained {args.captioner} on {len(corpus)} captions ({len(losses)} steps, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}); saved to {args.out}")
    return 0


# -- generate -------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    recorded = Path(args.decoder) / ENCODER_FILE
    spec = read_json(recorded) if recorded.is_file() else {}
    spec.update({k: getattr(args, k) for k in ENCODER_KEYS if getattr(args, k) is not None})
    if not (spec.get("family") or spec.get("factory") or spec.get("checkpoint")):
        raise SystemExit(f"no {ENCODER_FILE} in {args.decoder}: give the encoder flags")
    encoder, _, preprocess, _ = encoder_from_spec(spec, args.device)
    captioner = load_captioner(args.decoder, map_location=args.device)
    corpus = load_corpus(args.h5, "description", args.max_products)
    gap = None if args.keep_gap else load_gap(args.decoder)
    options = {"method": args.method} if args.method else {}
    embeddings = embed_corpus_images(encoder, preprocess, corpus, args.batch_size, args.view)
    if gap is not None:
        embeddings = remove_gap(embeddings, gap)
    rows = []
    for start in range(0, len(corpus), args.batch_size):
        captions = captioner.generate(embeddings[start:start + args.batch_size], **options)
        rows += [{"product_id": corpus.product_ids[start + i], "caption": c} for i, c in enumerate(captions)]

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    atomic_write(args.out, write)
    print(f"wrote {len(rows)} captions to {args.out}; e.g. {rows[0]['caption']!r}")
    return 0


# -- eval -----------------------------------------------------------------------------------------
def read_captions(path: str | Path) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {str(r["product_id"]): r["caption"] for r in rows}


def evaluate(predictions: dict[str, str], h5: str | Path, style: str = "full", use_java: bool | None = None) -> dict:
    """Caption metrics and entity accuracy of ``predictions`` against an h5 file's products."""
    corpus = load_corpus(h5, style)
    references, tags = corpus.references(), corpus.tags()
    unknown = sorted(set(predictions) - set(references))
    if unknown:
        raise KeyError(f"{len(unknown)} captioned product id(s) are not in {h5}, e.g. {unknown[:3]}")
    return {"captions": caption_metrics(predictions, references, use_java=use_java),
            "entities": entity_accuracy(predictions, tags), "style": style, "h5": str(h5)}


def cmd_eval(args) -> int:
    result = evaluate(read_captions(args.captions), args.h5, args.style, use_java=False if args.no_java else None)
    if args.out:
        write_json(args.out, result)
    scores, entities = result["captions"], result["entities"]
    print(" ".join(f"{k} {100 * v:.1f}" for k, v in scores.items() if isinstance(v, float)))
    print(" ".join(f"{k} {100 * v:.1f}" for k, v in entities.items() if isinstance(v, float)))
    for note in scores["notes"]:
        print("note:", note)
    return 0


# -- parser ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caption", description="Zero-shot captioning with CapDec / DeCap "
                                     "on any CLIP-like encoder (E2 included).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", parents=[common], help="train a captioner text-only on an h5 file's captions")
    t.add_argument("captioner", choices=("capdec", "decap"))
    t.add_argument("--train-h5", required=True)
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--style", default="full", help="caption style name or template (see STYLES)")
    t.add_argument("--max-products", type=int)
    _add_encoder_flags(t, defaults=True)
    s = t.add_argument_group("schedule (defaults: the captioner's reference values)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--warmup-steps", type=int)
    s.add_argument("--max-steps", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--log-every", type=int, default=100)
    c = t.add_argument_group("capdec")
    c.add_argument("--lm", default="gpt2", help="GPT-2 name or path, or 'tiny' (random, CPU-sized)")
    c.add_argument("--tokenizer", default="auto", choices=("auto", "gpt2", "clip_bpe", "word"))
    c.add_argument("--mapping", default="transformer", choices=("transformer", "mlp"))
    c.add_argument("--prefix-length", type=int)
    c.add_argument("--noise-variance", type=float, default=0.016)
    c.add_argument("--stop-token", default="auto",
                   help="'auto' ('.' for one-sentence captions, else end of text), 'eos', or a token")
    c.add_argument("--freeze-lm", action="store_true", help="train only the mapping network")
    d = t.add_argument_group("decap")
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--heads", type=int, default=4)
    d.add_argument("--width", type=int, default=768)
    d.add_argument("--max-caption-tokens", type=int, default=20)
    d.add_argument("--max-tokens", type=int, default=30)
    d.add_argument("--memory-size", type=int)
    d.add_argument("--compact-vocab", action="store_true", help="output layer over the corpus' BPE ids only")
    t.add_argument("--remove-gap", action="store_true",
                   help="also measure the modality gap (mean image - mean caption embedding of the training "
                        "products, no pairing used) and store it, so generate moves each image by it")
    t.set_defaults(run=cmd_train)

    g = sub.add_parser("generate", parents=[common],
                       help="caption the images of an h5 file (one view per product) to JSONL")
    g.add_argument("--decoder", required=True, help="directory saved by `caption train`")
    g.add_argument("--h5", required=True)
    g.add_argument("--out", required=True, help="captions .jsonl")
    g.add_argument("--method", choices=("beam", "greedy"), help="default: CapDec beam, DeCap greedy")
    g.add_argument("--view", type=int, default=0)
    g.add_argument("--max-products", type=int)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--keep-gap", action="store_true",
                   help="feed the raw image embeddings even when the decoder stored a modality gap")
    _add_encoder_flags(g, defaults=False)
    g.set_defaults(run=cmd_generate)

    e = sub.add_parser("eval", help="score captions JSONL against an h5 file's references and tags")
    e.add_argument("--captions", required=True)
    e.add_argument("--h5", required=True)
    e.add_argument("--style", default="full", help="the style of the reference captions")
    e.add_argument("--out", help="metrics .json")
    e.add_argument("--no-java", action="store_true", help="Python tokenisation, no METEOR")
    e.set_defaults(run=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
