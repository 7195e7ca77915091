"""The one way every command line loads an encoder: model flags in, a ClipBundle out.

    add_encoder_flags(parser)        # --family --model --pretrained --image-size --checkpoint --adapter --factory
    bundle = load_encoder(args)      # used by e2-adapter eval/classify/tag/index/search/export, cir, caption

``--checkpoint DIR`` is a ``save_pretrained`` folder (``e2_model.json``): it names its own family and
base, so the model flags are not needed with it. An older trainer's ``best/`` (``model.pt`` [+
``adapter/``]) still loads over the base the flags describe, read with ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
from pathlib import Path

import torch

from .io import load_adapter
from .pretrained import CONFIG_FILE, from_pretrained, is_pretrained_dir, read_config
from .zoo import DEFAULT_FAMILY, FAMILIES, ClipBundle, create_clip, remember_source, source_of

ENCODER_FIELDS = ("family", "model", "pretrained", "image_size", "encoder_seed", "checkpoint", "adapter", "factory")


def add_model_flags(p, default_model: str = "small", defaults: bool = True) -> None:
    """--family/--model/--pretrained/--image-size on a parser or argument group. ``defaults=False``
    leaves every flag None (a command that fills them from a recorded spec)."""
    d = (lambda value: value) if defaults else (lambda value: None)
    p.add_argument("--family", default=d(DEFAULT_FAMILY), choices=FAMILIES,
                   help="the CLIP family (one per e2_adapter.backends entry)")
    p.add_argument("--model", default=d(default_model), help="a tiny config (tiny, demo, small) or the family's model name")
    p.add_argument("--pretrained", default=d(None),
                   help="none, the family's tag (e.g. openai), or a .pt state dict of the same architecture")
    p.add_argument("--image-size", type=int, default=d(None), help="input size for tiny configs")


def add_encoder_flags(p, default_model: str = "small", defaults: bool = True) -> None:
    """The model flags plus where trained weights live (--checkpoint, --adapter) or --factory."""
    add_model_flags(p, default_model, defaults)
    p.add_argument("--encoder-seed", type=int, default=0 if defaults else None,
                   help="init seed of a randomly initialised (tiny) CLIP")
    p.add_argument("--checkpoint", help="a save_pretrained folder (a trainer's best/): loads with no other flags")
    p.add_argument("--adapter", help="an E2 adapter folder (adapter_config.json) to load into the base model")
    p.add_argument("--factory", help="module:function returning a ClipBundle or (model, tokenizer, preprocess)")


def import_object(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"expected module:function, got {spec!r}")
    return getattr(importlib.import_module(module), name)


def as_bundle(obj, family: str = "custom") -> ClipBundle:
    """A ClipBundle from a ClipBundle or a (model, tokenizer, preprocess) triple."""
    if isinstance(obj, ClipBundle):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) == 3:
        model, tokenizer, preprocess = obj
        return ClipBundle(model, tokenizer, preprocess, family, image_size=0)
    raise TypeError(f"an encoder factory must return a ClipBundle or (model, tokenizer, preprocess), got {type(obj)}")


def split_named_spec(item: str) -> tuple[str, str]:
    """A benchmark's ``--encoder NAME=SPEC`` as (name, spec); exits with a clear message when either is missing."""
    name, sep, spec = item.partition("=")
    if not (sep and name and spec):
        raise SystemExit(f"--encoder expects NAME=SPEC, got {item!r}")
    return name, spec


def for_each_encoder(items, run, json_path=None) -> dict:
    """``{name: run(name, spec)}`` for a benchmark's ``--encoder NAME=SPEC`` items; with ``json_path``
    the results so far are written (atomically) after every encoder: nothing is lost if a later one fails."""
    from .evaluation.report import save_json
    results = {}
    for item in items:
        name, spec = split_named_spec(item)
        results[name] = run(name, spec)
        if json_path:
            save_json(json_path, results)
    return results


def parse_encoder_spec(text: str) -> dict:
    """One encoder named on a command line (``NAME=SPEC`` in the benchmarks), as the fields it sets over
    the base flags: ``base``, a save_pretrained (or older best/) folder, an adapter folder, a ``.pt``
    state dict, or ``module:function``."""
    fields = {"checkpoint": None, "adapter": None, "factory": None}
    path = Path(text)
    if text == "base":
        return fields
    if path.is_dir() and (is_pretrained_dir(path) or (path / "model.pt").is_file()):
        return {**fields, "checkpoint": text}
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return {**fields, "adapter": text}
    if path.suffix == ".pt" and path.is_file():
        return {**fields, "pretrained": text}
    if ":" in text and not path.exists():
        return {**fields, "factory": text}
    raise ValueError(f"encoder {text!r}: not 'base', module:function, a save_pretrained folder ({CONFIG_FILE}), "
                     "an adapter folder (adapter_config.json) or a .pt state dict")


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


def _load_state(path: Path, device) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return torch.load(path, map_location=device, weights_only=True)  # a state dict: tensors only, no code


def _from_flags(args, device) -> ClipBundle:
    pretrained = getattr(args, "pretrained", None)
    state_path = Path(pretrained) if pretrained and pretrained.endswith(".pt") else None
    seed = getattr(args, "encoder_seed", None)
    bundle = create_clip(args.family or DEFAULT_FAMILY, args.model, None if state_path else pretrained,
                         getattr(args, "image_size", None), device, seed=seed)
    if state_path is not None:
        bundle.model.load_state_dict(_load_state(state_path, device))
        remember_source(bundle.model, {**source_of(bundle.model), "pretrained": _file_hash(state_path)})
    return bundle


def load_encoder(args, device=None) -> ClipBundle:
    """The encoder the flags in ``args`` describe (any object with the ``ENCODER_FIELDS`` attributes;
    missing ones count as unset), in eval mode on ``device`` (default ``args.device`` or CPU)."""
    device = device or getattr(args, "device", None) or "cpu"
    checkpoint, adapter, factory = (getattr(args, k, None) for k in ("checkpoint", "adapter", "factory"))
    given = [f"--{k}" for k, v in (("checkpoint", checkpoint), ("adapter", adapter), ("factory", factory)) if v]
    if len(given) > 1:
        raise ValueError(f"give one of --checkpoint, --adapter, --factory, not {' and '.join(given)}")
    if factory:
        bundle = as_bundle(import_object(factory)())
    elif checkpoint and is_pretrained_dir(checkpoint):
        bundle = from_pretrained(checkpoint)
    elif checkpoint:
        folder = Path(checkpoint)
        if not (folder / "model.pt").is_file():
            read_config(folder)  # raises the error that says what this folder lacks
        bundle = _from_flags(args, device)  # an older best/: full weights over the flags' base
        if (folder / "adapter").is_dir():
            load_adapter(bundle.model, folder / "adapter")
        bundle.model.load_state_dict(_load_state(folder / "model.pt", device))
    else:
        bundle = _from_flags(args, device)
        if adapter:
            load_adapter(bundle.model, adapter)
    bundle.model.to(device).eval()
    return bundle


def encoder_namespace(spec: dict, **extra) -> argparse.Namespace:
    """A flags namespace from a recorded spec dict (e.g. captioning's encoder.json)."""
    return argparse.Namespace(**{k: spec.get(k) for k in ENCODER_FIELDS}, **extra)
