"""Zero-shot captioning with two (or more) encoders, side by side: CapDec and DeCap, text-only.

For each encoder, each captioner is trained on FashionGen-layout captions embedded by *that
encoder's own text tower* (the encoder frozen), then captions the validation images from
``encode_image``. Reported: BLEU@1/4, METEOR, ROUGE-L, CIDEr (x100) and entity accuracy (% of
captions naming the product's brand / sub-category / composition / season), mean +- std over seeds.

    python benchmarks/captioning.py \\
        --family open_clip --model ViT-B-32 --pretrained openai \\
        --encoder CLIP-FT=runs/clipft/best --encoder E2=runs/e2/best \\
        --train-h5 data/fashionsynth_train.h5 --val-h5 data/fashionsynth_validation.h5 --seeds 0 1 2

    python benchmarks/captioning.py --encoder A=base --synth 300 --quick    # a CPU smoke run
    python benchmarks/captioning.py ... --set remove_gap=true    # decoders fed images with the modality gap removed
    python benchmarks/captioning.py --aggregate runs/cap/s0.json runs/cap/s1.json   # pool runs' rows

An encoder is NAME=SPEC, SPEC relative to the base model flags: ``base``, ``module:function`` (a
factory returning a ClipBundle or (model, tokenizer, preprocess)), a save_pretrained folder (a
trainer's best/; an older one with model.pt [+ adapter/] too), an E2 adapter folder, or a ``.pt``
state dict. From Python, call ``run_benchmark`` with bundles or zero-argument factories.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from e2_adapter.loading import add_model_flags, split_named_spec
from integrations.capdec import CapDec, small_gpt2_config, train_capdec
from integrations.captioning import (WordTokenizer, caption_metrics, embed_corpus_images, embed_texts,
                                     entity_accuracy, load_corpus, modality_gap, remove_gap)
from integrations.captioning.cli import encoder_from_spec, spec_from_string
from integrations.decap import DeCap, DeCapConfig, train_decap

COLUMNS = [("BLEU@1", "captions"), ("BLEU@4", "captions"), ("METEOR", "captions"), ("ROUGE-L", "captions"),
           ("CIDEr", "captions"), ("brand", "entities"), ("subcategory", "entities"), ("composition", "entities"),
           ("season", "entities")]


@dataclass
class Settings:
    """Everything but the encoder; the defaults follow the two papers where the data allows."""
    style: str = "tags_first"        # tags first: they survive the text tower's and decoders' truncation
    epochs: int = 10
    max_steps: int | None = None     # overrides epochs
    max_val: int | None = None       # validation products to caption (default all)
    # CapDec
    capdec_lm: str = "auto"          # "gpt2" (pretrained), "tiny" (random, word tokenizer), "auto": gpt2 if loadable
    capdec_mapping: str = "transformer"
    capdec_prefix_length: int | None = None
    capdec_layers: int = 8
    capdec_batch_size: int = 34
    capdec_lr: float | None = None   # None: 2e-5 with pretrained GPT-2, 1e-3 with the tiny one
    capdec_method: str = "beam"
    noise_variance: float = 0.016
    # Both: feed the decoders normalise(image - gap), the gap = mean training image - mean caption
    # embedding (integrations/captioning/gap.py); off in the papers' recipes
    remove_gap: bool = False
    # DeCap
    decap_layers: int = 4
    decap_heads: int = 4
    decap_width: int = 768
    decap_max_caption_tokens: int = 77  # DeCap: 20 (COCO captions); fashion texts need CLIP's full context
    decap_max_tokens: int = 77          # DeCap: 30
    decap_batch_size: int = 64
    decap_lr: float = 5e-4              # DeCap: 1e-5 over ~90k steps; small corpora need a larger step
    decap_compact_vocab: bool = True
    use_java: bool | None = None        # PTB tokenizer + METEOR; None: when java is on the PATH
    notes: list = field(default_factory=list)


QUICK = dict(epochs=3, capdec_lm="tiny", capdec_mapping="mlp", capdec_batch_size=16, decap_layers=2, decap_heads=2,
             decap_width=64, decap_batch_size=16, decap_lr=2e-3)


def _as_bundle(obj):
    return obj() if callable(obj) and not hasattr(obj, "model") else obj


def add_settings_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="CPU-sized decoders and 3 epochs")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help=f"override a setting ({', '.join(Settings.__dataclass_fields__)})")


def settings_from_flags(quick: bool, overrides: Sequence[str]) -> Settings:
    """The decoders' settings: the papers' (or ``QUICK``) with each ``FIELD=VALUE`` of --set applied."""
    settings = Settings(**(QUICK if quick else {}))
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in Settings.__dataclass_fields__ or key == "notes":
            raise SystemExit(f"--set: unknown setting {key!r}")
        setattr(settings, key, json.loads(value) if value[:1] in "0123456789-[{tfn" else value)
    return settings


def resolve_capdec_lm(settings: Settings) -> None:
    """"auto" becomes "gpt2" when the pretrained model loads, else "tiny" (with a note), once per run."""
    if settings.capdec_lm != "auto":
        return
    try:
        from transformers import GPT2LMHeadModel
        GPT2LMHeadModel.from_pretrained("gpt2")
        settings.capdec_lm = "gpt2"
    except OSError as exc:
        settings.capdec_lm = "tiny"
        settings.notes.append(f"CapDec: pretrained GPT-2 unavailable ({type(exc).__name__}); "
                              "used a random 4-layer GPT-2 with a word tokenizer")


def build_capdec(settings: Settings, embed_dim: int, captions: list[str], device: str) -> tuple[CapDec, float]:
    common = dict(mapping=settings.capdec_mapping, prefix_length=settings.capdec_prefix_length,
                  mapper_layers=settings.capdec_layers, noise_variance=settings.noise_variance, stop_token=None)
    if settings.capdec_lm == "gpt2":
        return CapDec.create(embed_dim, lm="gpt2", **common).to(device), settings.capdec_lr or 2e-5
    tokenizer = WordTokenizer.fit(captions)
    lm = small_gpt2_config(tokenizer, n_layer=4, n_head=4, n_embd=128, n_positions=256)
    model = CapDec.create(embed_dim, lm=lm, tokenizer=tokenizer, mapper_heads=4, **common)
    return model.to(device), settings.capdec_lr or 1e-3


def build_decap(settings: Settings, embed_dim: int, captions: list[str], device: str) -> DeCap:
    config = DeCapConfig(embed_dim, n_layer=settings.decap_layers, n_head=settings.decap_heads,
                         n_embd=settings.decap_width, max_caption_tokens=settings.decap_max_caption_tokens,
                         max_tokens=settings.decap_max_tokens)
    model = DeCap.for_captions(config, captions) if settings.decap_compact_vocab else DeCap(config)
    return model.to(device)


def fit_capdec(settings: Settings, embeddings: torch.Tensor, bundle, captions: list[str], seed: int,
               device: str) -> tuple[CapDec, list[float]]:
    """A CapDec trained from ``seed`` on ``embeddings`` (row i is captions[i]'s conditioning) with
    ``bundle``'s frozen encoder; returns it and its per-step losses."""
    torch.manual_seed(seed)
    model, lr = build_capdec(settings, embeddings.shape[1], captions, device)
    losses = train_capdec(model, bundle.model, bundle.tokenizer, captions, text_embeddings=embeddings,
                          epochs=settings.epochs, max_steps=settings.max_steps, seed=seed,
                          batch_size=settings.capdec_batch_size, lr=lr, warmup_steps=500)
    return model, losses


def fit_decap(settings: Settings, text: torch.Tensor, bundle, captions: list[str], seed: int,
              device: str) -> tuple[DeCap, list[float]]:
    """A DeCap trained from ``seed`` on the captions' text embeddings ``text`` (also its memory)."""
    torch.manual_seed(seed)
    model = build_decap(settings, text.shape[1], captions, device)
    losses = train_decap(model, bundle.model, bundle.tokenizer, captions, text_embeddings=text,
                         epochs=settings.epochs, max_steps=settings.max_steps, seed=seed,
                         batch_size=settings.decap_batch_size, lr=settings.decap_lr, warmup_steps=500)
    return model, losses


def run_benchmark(encoders: Mapping[str, object], train_h5: str | Path, val_h5: str | Path, *,
                  captioners: Sequence[str] = ("capdec", "decap"), seeds: Sequence[int] = (0, 1, 2),
                  settings: Settings | None = None, device: str = "cpu",
                  log: Callable[[str], None] = print) -> list[dict]:
    """One row per (encoder, captioner, seed): metrics, entity accuracy and example captions.

    ``encoders`` maps names to ClipBundle-like objects (``.model``, ``.tokenizer``, ``.preprocess``)
    or zero-argument factories returning one.
    """
    settings = settings or Settings()
    if "capdec" in captioners:
        resolve_capdec_lm(settings)
    train = load_corpus(train_h5, settings.style)
    val = load_corpus(val_h5, settings.style, settings.max_val)
    references, tags = val.references(), val.tags()
    rows = []
    for name, item in encoders.items():
        bundle = _as_bundle(item)
        encoder = bundle.model.to(device).eval()
        text = embed_texts(encoder, bundle.tokenizer, train.captions)  # frozen: computed once per encoder
        images = embed_corpus_images(encoder, bundle.preprocess, val)
        if settings.remove_gap:  # the training products' images and captions, not their pairing
            images = remove_gap(images, modality_gap(embed_corpus_images(encoder, bundle.preprocess, train), text))
        log(f"[{name}] {len(train)} training captions, {len(val)} validation images, width {text.shape[1]}"
            + (", modality gap removed" if settings.remove_gap else ""))
        for captioner in captioners:
            for seed in seeds:
                start = time.time()
                if captioner == "capdec":
                    model, losses = fit_capdec(settings, text, bundle, train.captions, seed, device)
                    captions = model.generate(images, method=settings.capdec_method)
                elif captioner == "decap":
                    model, losses = fit_decap(settings, text, bundle, train.captions, seed, device)
                    captions = model.generate(images)
                else:
                    raise ValueError(f"unknown captioner {captioner!r}")
                predictions = dict(zip(val.product_ids, captions))
                row = {"encoder": name, "captioner": captioner, "seed": seed, "steps": len(losses),
                       "final_loss": losses[-1],
                       "captions": caption_metrics(predictions, references, use_java=settings.use_java),
                       "entities": entity_accuracy(predictions, tags),
                       "examples": [{"caption": c, "reference": references[p][0]}
                                    for p, c in list(predictions.items())[:3]]}
                rows.append(row)
                log(f"[{name}] {captioner} seed {seed}: BLEU@4 {100 * row['captions']['BLEU@4']:.1f}, "
                    f"brand {100 * row['entities']['brand']:.0f}%, {time.time() - start:.0f} s")
    return rows


def summarize(rows: list[dict]) -> dict:
    """{(captioner, encoder): {column: (mean, std)}} in percent; std is 0 for one seed."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["captioner"], row["encoder"]), []).append(row)
    out = {}
    for key, group in groups.items():
        stats = {}
        for column, part in COLUMNS:
            values = [100 * r[part][column] for r in group if r[part].get(column) is not None]
            if values:
                stats[column] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        out[key] = stats
    return out


def markdown_table(rows: list[dict]) -> str:
    summary = summarize(rows)
    seeds = sorted({r["seed"] for r in rows})
    header = ["captioner", "encoder"] + [c for c, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (captioner, encoder), stats in summary.items():
        cells = [f"{stats[c][0]:.1f} ± {stats[c][1]:.1f}" if c in stats else "n/a" for c, _ in COLUMNS]
        lines.append("| " + " | ".join([captioner, encoder] + cells) + " |")
    lines.append("")
    lines.append(f"Mean ± std over seeds {seeds}. Caption metrics x100 (pycocoevalcap; SPICE skipped: it needs "
                 "a CoreNLP download); entity columns: % of captions naming the product's tag value.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", action="append", metavar="NAME=SPEC")
    p.add_argument("--aggregate", nargs="+", metavar="JSON",
                   help="only print mean ± std over the rows of earlier runs' --out files (e.g. one per encoder seed)")
    b = p.add_argument_group("base model (what SPECs load onto)")
    add_model_flags(b, default_model="tiny")
    b.add_argument("--encoder-seed", type=int, default=0, help="init seed of a random base model")
    d = p.add_argument_group("data")
    d.add_argument("--train-h5")
    d.add_argument("--val-h5")
    d.add_argument("--synth", type=int, help="write a FashionSynth with this many training products instead")
    d.add_argument("--synth-image-size", type=int, default=None, help="default: the base model's input size")
    p.add_argument("--captioners", nargs="+", default=["capdec", "decap"], choices=("capdec", "decap"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add_settings_flags(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write rows, summary and table as JSON here")
    args = p.parse_args(argv)
    if args.aggregate:
        print(markdown_table([row for path in args.aggregate for row in json.loads(Path(path).read_text())["rows"]]))
        return 0
    if not args.encoder:
        p.error("--encoder (at least one) is required unless --aggregate is given")

    settings = settings_from_flags(args.quick, args.set)

    base = {"family": args.family, "model": args.model, "pretrained": args.pretrained,
            "image_size": args.image_size, "encoder_seed": args.encoder_seed}
    encoders = {}
    for item in args.encoder:
        name, spec = split_named_spec(item)
        encoders[name] = (lambda s=spec_from_string(spec, base): named_bundle(s, args.device))
    if args.synth:
        from e2_adapter.data.synth import write_fashionsynth
        size = args.synth_image_size or named_bundle(base, "cpu").image_size
        out_dir = Path(args.out).parent if args.out else Path("runs")
        args.train_h5, args.val_h5 = write_fashionsynth(out_dir / "captioning_synth", products=args.synth,
                                                        val_products=max(20, args.synth // 5), image_size=size)
    if not (args.train_h5 and args.val_h5):
        raise SystemExit("give --train-h5 and --val-h5, or --synth N")

    rows = run_benchmark(encoders, args.train_h5, args.val_h5, captioners=args.captioners, seeds=args.seeds,
                         settings=settings, device=args.device)
    table = markdown_table(rows)
    print("\n" + table)
    for note in settings.notes:
        print("note:", note)
    if args.out:
        summary = {f"{c}/{e}": stats for (c, e), stats in summarize(rows).items()}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": asdict(settings), "rows": rows, "summary": summary,
                                              "table": table}, indent=1))
    return 0


def named_bundle(spec: dict, device: str):
    from types import SimpleNamespace
    encoder, tokenizer, preprocess, _ = encoder_from_spec(spec, device)
    size = getattr(getattr(encoder, "visual", None), "image_size", None)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return SimpleNamespace(model=encoder, tokenizer=tokenizer, preprocess=preprocess, image_size=size)


if __name__ == "__main__":
    sys.exit(main())
