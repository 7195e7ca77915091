"""What ``e2-adapter classify | tag | index | search`` do once their flags are parsed (cli.py only
registers the flags). Catalogues arrive already opened, through the CLI's one catalogue opener."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import DEFAULT_ENTITIES
from ..loading import ENCODER_FIELDS, encoder_namespace, load_encoder
from .classify import classify
from .images import list_image_files
from .index import CatalogueIndex, build_index
from .tag import tag, write_tags
from .vocab import parse_label_flags, read_vocabulary, vocabulary_from_catalogue


def add_vocab_flags(p, required: bool = False) -> None:
    g = p.add_argument_group("labels per entity" + (" (one of these is required)" if required else ""))
    g.add_argument("--labels", action="append", default=[], metavar="ENTITY=A,B,C",
                   help="labels of one entity, e.g. brand=Ostra,Vetrano (repeat per entity)")
    g.add_argument("--vocab", help="JSON file {entity: [label, ...]}")
    g.add_argument("--vocab-from", metavar="DATA", help="every tag value in this catalogue (e.g. the training h5)")
    g.add_argument("--entities", nargs="*", help="restrict to these entities")


def vocabulary_from_args(args, open_catalogue, fallback=None) -> dict[str, list[str]] | None:
    """--labels, --vocab or --vocab-from (a catalogue opened with the data flags); ``fallback``
    (a catalogue) gives its own tag values when none of them is given."""
    vocab = {}
    if args.vocab:
        vocab.update(read_vocabulary(args.vocab))
    if args.vocab_from:
        source = open_catalogue(args, args.vocab_from, _entities(args), "train")
        vocab.update(vocabulary_from_catalogue(source, args.entities))
    vocab.update(parse_label_flags(args.labels))
    if not vocab and fallback is not None:
        vocab = vocabulary_from_catalogue(fallback, args.entities)
    if args.entities:
        missing = [e for e in args.entities if e not in vocab]
        if missing:
            raise SystemExit(f"--entities {missing} have no labels: add --labels {missing[0]}=... or a --vocab with them")
        vocab = {e: vocab[e] for e in args.entities}
    return vocab or None


def _entities(args) -> tuple[str, ...]:
    return tuple(args.entities or DEFAULT_ENTITIES)


def _images_and_ids(args, open_catalogue):
    """(images, ids, catalogue): image files given on the command line, or the first view of each
    product of --data."""
    if args.images_in and args.data:
        raise SystemExit("give image files or --data, not both")
    if args.images_in:
        files = list_image_files(args.images_in)
        return files, [str(f) for f in files], None
    if not args.data:
        raise SystemExit("nothing to label: give image files or folders, or --data CATALOGUE")
    from .images import CatalogueImages
    catalogue = open_catalogue(args, args.data, _entities(args), "test")
    return CatalogueImages(catalogue), catalogue.product_ids(), catalogue


def _emit(rows: list[dict], out: str | None) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    else:
        print("\n".join(lines))


def run_classify(args, open_catalogue) -> list[dict]:
    images, ids, catalogue = _images_and_ids(args, open_catalogue)
    vocab = vocabulary_from_args(args, open_catalogue)
    if vocab is None:
        raise SystemExit("classify needs labels: --labels brand=A,B, --vocab FILE.json or --vocab-from DATA")
    templates = read_vocabulary(args.templates) if args.templates else None
    bundle = load_encoder(args)
    preds = classify(bundle, images, vocab, templates=templates, top_k=args.top_k, batch_size=args.batch_size)
    rows = [{"id": i, "labels": {e: [p.to_dict() for p in ps] for e, ps in row.items()}} for i, row in zip(ids, preds)]
    _emit(rows, args.out)
    return rows


def run_tag(args, open_catalogue) -> Path:
    images, ids, catalogue = _images_and_ids(args, open_catalogue)
    vocab = vocabulary_from_args(args, open_catalogue, fallback=catalogue)
    if vocab is None:
        raise SystemExit("tag needs each entity's labels: --vocab-from TRAIN_DATA (its tags), --vocab FILE.json "
                         "or --labels brand=A,B")
    bundle = load_encoder(args)
    rows = tag(bundle, images, vocab, top_k=args.top_k, batch_size=args.batch_size)
    path = write_tags(rows, ids, args.out)
    print(f"tagged {len(rows)} images ({', '.join(vocab)}) -> {path}")
    return path


def recorded_encoder(args) -> dict:
    """What ``search`` needs to load the same encoder again: the checkpoint folder, or the flags."""
    spec = {k: getattr(args, k, None) for k in ENCODER_FIELDS}
    for k in ("checkpoint", "adapter"):
        if spec[k]:
            spec[k] = str(Path(spec[k]).resolve())
    return spec


def run_index(args, catalogue) -> CatalogueIndex | None:
    """Under torchrun every rank embeds a shard of the catalogue and rank 0 writes the index."""
    from ..training.distributed import init_distributed
    distributed = init_distributed()
    bundle = load_encoder(args)
    vocab = vocabulary_from_args(args, lambda *_: None) if (args.labels or args.vocab) else None
    index = build_index(bundle, catalogue, args.out, vocabulary=vocab, faiss=args.faiss,
                        embeddings_format=args.embeddings, batch_size=args.batch_size,
                        encoder=recorded_encoder(args), distributed=distributed)
    if index is not None:
        print(f"indexed {len(index)} products into {args.out}" + (f" (faiss {args.faiss})" if args.faiss else ""))
    return index


def run_search(args) -> list[dict]:
    if (args.query is None) == (args.image is None):
        raise SystemExit('search needs a text query or --image PATH (one of them): e2-adapter search INDEX "navy coat"')
    index = CatalogueIndex.load(args.index)
    given = {k: getattr(args, k, None) for k in ENCODER_FIELDS if getattr(args, k, None) is not None}
    spec = {**(index.config.get("encoder") or {}), **given}
    if not any(spec.get(k) for k in ("checkpoint", "factory", "family")):
        raise SystemExit(f"{args.index} does not record its encoder: give --checkpoint (the model that built it)")
    bundle = load_encoder(encoder_namespace(spec, device=args.device))
    if args.filter and any("=" not in f for f in args.filter):
        raise SystemExit("--filter takes ENTITY=VALUE, e.g. --filter brand=Ostra")
    filters = dict(f.split("=", 1) for f in args.filter) if args.filter else None
    hits = (index.search_image(bundle, args.image, args.k, filters) if args.image
            else index.search_text(bundle, args.query, args.k, filters))
    rows = [h.to_dict() for h in hits]
    if args.json:
        _emit(rows, None)
    else:
        for h in hits:
            print(f"{h.rank:3d}  {h.score:.4f}  {h.product_id}  {h.text[:80]}")
    return rows
