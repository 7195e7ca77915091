"""``e2-adapter`` command line. Thin: parse flags, call the library.

    e2-adapter synth --out data/ --products 2000 --seed 0
    e2-adapter train --train data/fashionsynth_train.h5 --val data/fashionsynth_validation.h5 --out runs/e2
    e2-adapter eval  --data data/fashionsynth_validation.h5 --checkpoint runs/e2/best --protocols sample-100
    e2-adapter demo  [--quick]
    e2-adapter caption ... / e2-adapter cir ...   (pipelines registered in e2_adapter.commands)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from dataclasses import MISSING, fields

from .commands import commands
from .config import DEFAULT_ENTITIES, E2Config
from .training.config import TrainConfig, adapter_flag_fields


# --- data and models from flags ------------------------------------------------------------------

# add_model_flags / load_encoder live in the library (e2_adapter.loading), shared by every command line.
from .loading import add_encoder_flags, add_model_flags, load_encoder  # noqa: E402,F401


def add_data_flags(p: argparse.ArgumentParser, *names: str) -> None:
    p.add_argument("--format", default="fashiongen", choices=("fashiongen", "amazon", "manifest"),
                   help="fashiongen: FashionGen-schema h5 (FashionSynth too); amazon: meta JSONL; manifest: CSV/JSONL")
    for name in names:
        p.add_argument(f"--{name}", required=name != "val", help=f"{name} data file")
    p.add_argument("--images", help="image folder (amazon)")
    p.add_argument("--split-file", help="split file (amazon)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--text-column", default="text")
    p.add_argument("--product-column", default=None)
    p.add_argument("--max-products", type=int, default=None)
    p.add_argument("--encoding", default=None,
                   help="text encoding of the data file (default: latin-1 for fashiongen h5, utf-8 for manifests)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="manifest / amazon: skip unreadable or empty image files (with a warning) instead of stopping")


def open_catalogue(args, path: str, entities, split: str = "train"):
    from .data import AmazonFashion, FashionGenH5, ManifestCatalogue
    if args.format == "fashiongen":
        return FashionGenH5(path, entities=entities, max_products=args.max_products,
                            encoding=args.encoding or "latin-1")
    if args.format == "amazon":
        if not args.images:
            raise SystemExit("--format amazon needs --images (the folder of <asin>.jpg files)")
        return AmazonFashion(path, args.images, args.split_file, split=split,
                             bad_images="skip" if args.skip_bad_images else "error")
    return ManifestCatalogue(path, image_column=args.image_column, text_column=args.text_column,
                             product_column=args.product_column, tag_columns=tuple(entities),
                             encoding=args.encoding or "utf-8-sig",
                             bad_images="skip" if args.skip_bad_images else "error")


# --- TrainConfig fields (the adapter section's included) become flags ---------------------------------

def _flag_kind(hint) -> tuple[str, type]:
    """("bool" | "tuple" | "scalar", element type) of a field's type hint, Optional stripped."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] \
        if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    base = args[0]
    if base is bool:
        return "bool", bool
    if typing.get_origin(base) is tuple:
        return "tuple", typing.get_args(base)[0]
    return "scalar", base


def add_dataclass_flags(p, cls, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field (``--field-name``), typed from its hint, help from its metadata;
    every default is None, meaning "not given" (the dataclass's own default, or the --config file's)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, elem = _flag_kind(hints[f.name])
        default = f.default if f.default is not MISSING else None
        help_text = f.metadata.get("help", "")
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind == "tuple":
            p.add_argument(flag, nargs="*", type=elem, default=None, metavar=f.name.upper(),
                           help=f"{help_text} (default {default})")
        else:
            p.add_argument(flag, type=elem, default=None, help=f"{help_text} (default {default})")


def train_config_from(args) -> TrainConfig:
    """The TrainConfig of --config (if any) with every flag given on the command line over it."""
    def given(names):
        return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    top = given(f.name for f in fields(TrainConfig) if f.name != "adapter")
    adapter = given(adapter_flag_fields())
    if args.config:
        return TrainConfig.from_file(args.config, **top, adapter=adapter)
    return TrainConfig.from_dict({**top, "adapter": adapter})


# --- commands ---------------------------------------------------------------------------------------

def cmd_synth(args) -> None:
    from .data import synth_spec_from_args
    spec = synth_spec_from_args(args)
    train, val = spec.write(args.out)
    print(f"wrote {train} and {val}")


def cmd_train(args) -> None:
    from .training.distributed import init_distributed
    from .training.trainer import Trainer, pick_device
    cfg = train_config_from(args)
    pick_device(cfg.device)  # a device that is not there is an error before any work
    init_distributed()
    if getattr(args, "encoder_seed", None) is None:
        args.encoder_seed = cfg.seed  # so two runs with one --seed start from one random model
    bundle = load_encoder(args, device="cpu")  # the trainer moves it to its device
    train = open_catalogue(args, args.train, cfg.entities, "train")
    val = open_catalogue(args, args.val, cfg.entities, "test") if args.val else None
    trainer = Trainer(bundle.model, bundle.tokenizer, bundle.preprocess, train, val, cfg, args.out, bundle.family)
    state = trainer.fit(resume=args.resume, overwrite=args.overwrite)
    if trainer.is_main:
        print(json.dumps({"best_SumR": state.best_sumr, "best_step": state.best_step, "steps": state.step}))


def cmd_eval(args) -> None:
    from .evaluation.embed import evaluate, linear_probe_entities
    from .evaluation.report import results_to_markdown, save_json
    from .training.distributed import init_distributed, rank_and_world
    distributed = init_distributed()  # under torchrun every rank embeds a shard; rank 0 reports
    bundle = load_encoder(args)
    model = bundle.model
    entities = tuple(args.entities) if args.entities else None
    data = open_catalogue(args, args.data, entities or DEFAULT_ENTITIES, "test")
    results = evaluate(model, data, bundle.preprocess, bundle.tokenizer, tuple(args.protocols), seed=args.seed,
                       distributed=distributed)
    if args.probe_train:
        train = open_catalogue(args, args.probe_train, data.entities, "train")
        results["linear-probe"] = linear_probe_entities(model, train, data, bundle.preprocess, bundle.tokenizer,
                                                        distributed=distributed)
    if rank_and_world()[0] != 0:
        return
    print(results_to_markdown({p: r for p, r in results.items() if p != "linear-probe"}, name_header="protocol"))
    if "linear-probe" in results:
        print(results_to_markdown({"accuracy": results["linear-probe"]}, name_header="linear probe"))
    if args.json:
        save_json(args.json, results)


def cmd_classify(args) -> None:
    from .product.commands import run_classify
    run_classify(args, open_catalogue)


def cmd_tag(args) -> None:
    from .product.commands import run_tag
    run_tag(args, open_catalogue)


def cmd_index(args) -> None:
    from .product.commands import run_index
    run_index(args, open_catalogue(args, args.data, tuple(args.entities or DEFAULT_ENTITIES), "test"))


def cmd_search(args) -> None:
    from .product.commands import run_search
    run_search(args)


def cmd_export(args) -> None:
    from .export import export_onnx
    out = export_onnx(load_encoder(args), args.out)
    print(f"wrote {out / 'image_encoder.onnx'}, {out / 'text_encoder.onnx'} and {out / 'export.json'}")


def cmd_demo(args) -> None:
    from .demo import run
    run(args)


def add_product_parsers(sub) -> None:
    """classify / tag / index / search / export: flags only; the work is in e2_adapter.product and .export."""
    from .product.commands import add_vocab_flags

    def labelled(name, help_text, out_help):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("images_in", nargs="*", metavar="IMAGE", help="image files or folders")
        add_encoder_flags(p)
        add_data_flags(p)
        p.add_argument("--data", help="label the first view of every product of this catalogue instead")
        add_vocab_flags(p)
        p.add_argument("--top-k", type=int, default=3 if name == "classify" else 1)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--out", required=name == "tag", help=out_help)
        return p

    p = labelled("classify", "zero-shot labels per entity from the global embedding (JSONL)", "JSONL file (default: stdout)")
    p.add_argument("--templates", help="JSON {entity: [prompt with {}, ...]} (default: built-in per-entity prompts)")
    p.set_defaults(func=cmd_classify)
    p = labelled("tag", "tags per entity from E2's region heads (CSV or JSONL)", "tags.csv or tags.jsonl")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("index", help="embed a catalogue into a searchable folder")
    add_encoder_flags(p)
    add_data_flags(p, "data")
    add_vocab_flags(p)
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--faiss", choices=("exact", "ivf", "hnsw"), help="also write a faiss index (pip install faiss-cpu)")
    p.add_argument("--embeddings", default="safetensors", choices=("safetensors", "npy"))
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search an index by text or by image")
    p.add_argument("index", help="folder written by `e2-adapter index`")
    p.add_argument("query", nargs="?", help="text query")
    p.add_argument("--image", help="an image file: image-to-image search")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--filter", action="append", metavar="ENTITY=VALUE", help="keep products with this predicted tag")
    p.add_argument("--json", action="store_true", help="print hits as JSON lines")
    p.add_argument("--device", default="cpu")
    add_encoder_flags(p, defaults=False)  # unset: the encoder recorded in the index
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("export", help="ONNX export of the image and text encoders (dynamic batch)")
    add_encoder_flags(p)
    p.add_argument("--out", required=True, help="folder for image_encoder.onnx, text_encoder.onnx, export.json")
    p.set_defaults(func=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e2-adapter", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write FashionSynth h5 files in FashionGen's schema")
    p.add_argument("--out", required=True)
    from .data.synth import add_synth_flags
    add_synth_flags(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="fine-tune with E2 or the CLIP-FT baseline (two-stage recipe)")
    add_model_flags(p)
    add_data_flags(p, "train", "val")
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in OUT")
    p.add_argument("--config", help="JSON file of TrainConfig fields, the adapter's in its 'adapter' section "
                   "(flags override it)")
    add_dataclass_flags(p, TrainConfig, skip=("adapter",))
    add_dataclass_flags(p.add_argument_group("adapter (the config's 'adapter' section)"), E2Config,
                        only=adapter_flag_fields())
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="retrieval protocols and linear probes")
    add_model_flags(p)
    add_data_flags(p, "data")
    p.add_argument("--checkpoint", help="a trainer's best/ folder")
    p.add_argument("--adapter", help="an adapter folder (E2 weights only) to load into the base model")
    p.add_argument("--protocols", nargs="+", default=["product-full", "sample-100"],
                   choices=("product-full", "image-full", "sample-100"))
    p.add_argument("--probe-train", help="training data for per-entity linear probes")
    p.add_argument("--entities", nargs="*")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="end-to-end FashionSynth comparison of CLIP-FT and E2 (CPU)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="fine-tuning steps per method (default: 300; --quick: 20)")
    p.add_argument("--workers", type=int, help="methods fine-tuned at a time, one process each "
                   "(default: 2 where there are 2 cores)")
    p.set_defaults(func=cmd_demo)

    add_product_parsers(sub)

    # Pipelines (captioning, composed retrieval, plug-ins) register in e2_adapter.commands; each parses
    # its own flags, and is imported only when its command runs.
    for name, command in commands().items():
        if name in sub.choices:
            raise ValueError(f"pipeline command {name!r} ({command.target}) clashes with a built-in command")
        p = sub.add_parser(name, help=f"{command.help} (see `e2-adapter {name} -h`)".lstrip(), add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda a, c=command: c.load()(a.rest))
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    for name, p in sub.choices.items():
        if p.add_help:  # the integrations' pass-through parsers take every flag as theirs
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean a bad input or option, not a bug: shown as one message, no traceback."""
    from .backends.base import UnsupportedModelError
    from .data.catalogue import DataFormatError
    from .training.trainer import TrainingDiverged
    return (DataFormatError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError, TrainingDiverged, UnsupportedModelError)


def main(argv: list[str] | None = None) -> None:
    """Known errors print ``e2-adapter: error: ...`` and exit 2 (1 when training diverged);
    ``--debug`` or ``E2_ADAPTER_DEBUG=1`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("E2_ADAPTER_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("e2-adapter: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        if debug or not isinstance(err, user_errors()):
            raise
        from .training.trainer import TrainingDiverged
        message = str(err) if not isinstance(err, OSError) or not err.filename else \
            f"{err.strerror or err}: {err.filename}"
        print(f"e2-adapter: error: {message}\n(rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(1 if isinstance(err, TrainingDiverged) else 2)


if __name__ == "__main__":
    main(sys.argv[1:])
