"""``caption train | generate | eval``: thin argument parsing over the captioning library.

    caption train capdec --train-h5 train.h5 --out runs/capdec [--adapter runs/e2]
    caption generate --decoder runs/capdec --h5 validation.h5 --out captions.jsonl
    caption eval --captions captions.jsonl --h5 validation.h5 --out metrics.json

The encoder is described by flags (CLIP family, model, weights, optional E2 adapter directory).
``train`` records them in ``encoder.json`` beside the decoder and ``generate`` reuses them, so a
decoder is always run with the encoder whose text tower trained it unless told otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch

from integrations.capdec import CapDec, small_gpt2_config, train_capdec
from integrations.decap import DeCap, DeCapConfig, train_decap

from .checkpoint import atomic_write, read_config, read_json, write_json
from .data import load_corpus, single_sentence
from .encoders import embed_texts, resolve_encoder
from .metrics import caption_metrics, entity_accuracy
from .tokenizers import ClipBPETokenizer, HFTokenizer, WordTokenizer

ENCODER_FILE = "encoder.json"
ENCODER_KEYS = ("family", "model", "pretrained", "image_size", "encoder_seed", "checkpoint", "adapter", "factory")


# -- encoders ---------------------------------------------------------------------------------------
def _add_encoder_flags(p: argparse.ArgumentParser, defaults: bool) -> None:
    """The project's model flags (as in ``e2-adapter train`` and ``cir``), plus where E2 weights live."""
    d = (lambda value: value) if defaults else (lambda value: None)  # generate: None = "as recorded"
    g = p.add_argument_group("encoder (recorded in encoder.json by train, reused by generate)")
    g.add_argument("--family", default=d("open_clip"), choices=("open_clip", "openai", "hf"))
    g.add_argument("--model", default=d("tiny"), help="a tiny config (tiny, small) or the family's model name")
    g.add_argument("--pretrained", default=d(None), help="none, the family's tag, or a .pt state dict")
    g.add_argument("--image-size", type=int, default=d(None), help="input size for tiny configs")
    g.add_argument("--encoder-seed", type=int, default=d(0), help="init seed of a randomly initialised CLIP")
    g.add_argument("--checkpoint", default=d(None), help="a trainer's best/ folder (model.pt [+ adapter/])")
    g.add_argument("--adapter", default=d(None), help="an E2 adapter folder to load onto the base CLIP")
    g.add_argument("--factory", default=d(None), help="module:function returning a ClipBundle or "
                                                      "(model, tokenizer, preprocess)")


def spec_from_string(text: str, base: dict) -> dict:
    """An encoder named on a command line (``NAME=SPEC`` in the benchmark), relative to ``base``:
    ``base``, ``module:function``, a trainer's best/ folder (model.pt), an E2 adapter folder
    (adapter_config.json), or a ``.pt`` state dict: the same forms as ``e2-adapter cir``."""
    spec = {**base, "checkpoint": None, "adapter": None, "factory": None}
    path = Path(text)
    if text == "base":
        pass
    elif path.is_dir() and (path / "model.pt").is_file():
        spec["checkpoint"] = text
    elif path.is_dir() and (path / "adapter_config.json").is_file():
        spec["adapter"] = text
    elif path.suffix == ".pt" and path.is_file():
        spec["pretrained"] = text
    elif ":" in text and not path.exists():
        spec["factory"] = text
    else:
        raise ValueError(f"encoder {text!r}: not 'base', module:function, a checkpoint folder (model.pt), "
                         "an adapter folder (adapter_config.json) or a .pt state dict")
    return spec


def _bundle_from_factory(path: str):
    module, _, name = path.partition(":")
    made = getattr(importlib.import_module(module), name)()
    if isinstance(made, (tuple, list)):
        return SimpleNamespace(model=made[0], tokenizer=made[1], preprocess=made[2])
    return made


def load_encoder(spec: dict, device: str = "cpu"):
    """(encoder, clip tokenizer, image preprocess, name) from an encoder spec (see ``ENCODER_KEYS``)."""
    if spec.get("factory"):
        bundle = _bundle_from_factory(spec["factory"])
        encoder = resolve_encoder(bundle.model)
    else:
        from e2_adapter.cli import load_bundle
        torch.manual_seed(spec.get("encoder_seed") or 0)  # random (tiny) CLIPs are rebuilt identically
        flags = SimpleNamespace(family=spec["family"], model=spec["model"], pretrained=spec.get("pretrained"),
                                image_size=spec.get("image_size"))
        bundle = load_bundle(flags, device=device)
        encoder = bundle.model
        if spec.get("checkpoint"):
            checkpoint = Path(spec["checkpoint"])
            if (checkpoint / "adapter").is_dir():  # an E2 model: wrap first, then the full weights
                encoder = resolve_encoder(adapter_dir=str(checkpoint / "adapter"), base=encoder)
            encoder.load_state_dict(torch.load(checkpoint / "model.pt", map_location=device, weights_only=True))
        elif spec.get("adapter"):
            encoder = resolve_encoder(adapter_dir=spec["adapter"], base=encoder)
    name = spec.get("factory") or spec.get("checkpoint") or spec.get("adapter") or f"{spec['family']}:{spec['model']}"
    return encoder.to(device).eval(), bundle.tokenizer, bundle.preprocess, name


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
    encoder, clip_tokenizer, _, name = load_encoder(spec, args.device)
    embeddings = embed_texts(encoder, clip_tokenizer, corpus.captions)  # once, shared by the memory bank
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
    if "family" not in spec and not spec.get("factory"):
        raise SystemExit(f"no {ENCODER_FILE} in {args.decoder}: give the encoder flags")
    encoder, _, preprocess, _ = load_encoder(spec, args.device)
    captioner = load_captioner(args.decoder, map_location=args.device)
    corpus = load_corpus(args.h5, "description", args.max_products)
    options = {"method": args.method} if args.method else {}
    rows = []
    for start in range(0, len(corpus), args.batch_size):
        products = range(start, min(start + args.batch_size, len(corpus)))
        images = torch.stack([preprocess(im) for im in corpus.images(products, view=args.view)])
        for p, caption in zip(products, captioner.caption(encoder, images, **options)):
            rows.append({"product_id": corpus.product_ids[p], "caption": caption})

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
