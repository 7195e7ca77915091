"""One creation API for the CLIP models e2-adapter works with, pretrained or randomly initialised.

Model sizes are data (``TINY_CONFIGS``), as in open_clip's ``model_configs``: the tiny ones let the
tests, the demo and CI run on a CPU with no downloads. How a family builds a tiny model, loads a
named checkpoint or rebuilds a saved one is its backend's business (``e2_adapter.backends``); this
module only picks the backend and records where the model came from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .backends import BACKENDS, VisionBackend, unwrap_peft
from .backends.base import CLIP_VOCAB_SIZE, bpe_tokenizer, clip_transform  # noqa: F401  (re-exported)

# The registry is the list: a new backend is a new --family choice, unless another family's loader builds
# its models (open_clip builds timm towers, transformers' classes build SigLIP).
FAMILIES = tuple(name for name, b in BACKENDS.items() if b.zoo_family in (None, name))
DEFAULT_FAMILY = "open_clip"

# Small ViT CLIPs for CPU work. Depth 6 keeps E2's layout meaningful (fusion after blocks 4 and 5).
TINY_CONFIGS: dict[str, dict] = {
    "tiny": dict(embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=6,
                 vision_heads=2, context_length=32, text_width=64, text_layers=2, text_heads=2),
    # The demo's model: 64 px images in a 4 x 4 grid of 16 px patches (ViT-B/32's 7 x 7 grid, scaled down).
    "demo": dict(embed_dim=64, image_size=64, patch_size=16, vision_width=96, vision_layers=6,
                 vision_heads=3, context_length=48, text_width=64, text_layers=2, text_heads=2),
    "small": dict(embed_dim=128, image_size=64, patch_size=8, vision_width=128, vision_layers=6,
                  vision_heads=4, context_length=64, text_width=128, text_layers=4, text_heads=4),
    # SigLIP's layout (no class token, attention-pooling head, no projection, sigmoid loss) at tiny's size:
    # open_clip builds it as a timm tower (ViT-B-16-SigLIP's), hf as a transformers SiglipModel.
    "tiny-siglip": dict(embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=6,
                        vision_heads=2, context_length=32, text_width=64, text_layers=1, text_heads=2,
                        tower="siglip"),
}
VOCAB_SIZE = CLIP_VOCAB_SIZE


@dataclass
class ClipBundle:
    """A model with the tokenizer and image transform that belong to it."""
    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable | None
    family: str
    image_size: int

    @property
    def source(self) -> dict | None:
        """How this model was built (family, model, pretrained, image size, tokenizer): see ``source_of``."""
        return source_of(self.model)


# Where a model came from, recorded on the model object itself so that whoever saves it later (the
# trainer, save_pretrained) can name its base without being told. A plain attribute: not in the state dict.
SOURCE_ATTR = "_e2_source"


def remember_source(model: nn.Module, source: dict) -> nn.Module:
    object.__setattr__(model, SOURCE_ATTR, dict(source))
    return model


def source_of(model: nn.Module) -> dict | None:
    inner = unwrap_peft(model)
    found = getattr(inner, SOURCE_ATTR, None)
    return dict(found) if found is not None else None


def tiny_config(name: str, image_size: int | None = None) -> dict:
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny config {name!r}; choose one of {sorted(TINY_CONFIGS)}")
    cfg = dict(TINY_CONFIGS[name])
    if image_size is not None:
        if image_size % cfg["patch_size"]:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {cfg['patch_size']}")
        cfg["image_size"] = image_size
    return cfg


def backend_class(family: str) -> type[VisionBackend]:
    if family not in BACKENDS:
        raise ValueError(f"unknown CLIP family {family!r}; choose one of {FAMILIES}")
    return BACKENDS[family]


def create_clip(family: str = DEFAULT_FAMILY, model_name: str = "tiny", pretrained: str | None = None,
                image_size: int | None = None, device: str | torch.device = "cpu", seed: int | None = None) -> ClipBundle:
    """Build a CLIP of the given family.

    ``model_name`` is a key of ``TINY_CONFIGS`` (random init; ``pretrained`` must be None) or the
    family's own model name (``ViT-B-32`` for open_clip, ``ViT-B/32`` for openai, a hub id or local
    folder for hf), which may need the internet the first time.
    """
    backend = backend_class(family)
    if seed is not None:
        torch.manual_seed(seed)
    if model_name in TINY_CONFIGS:
        if pretrained not in (None, "", "none"):
            raise ValueError(f"tiny config {model_name!r} has no pretrained weights; use --pretrained none "
                             "or load a folder written by e2_adapter.save_pretrained with --checkpoint")
        cfg = tiny_config(model_name, image_size)
        model = backend.build_tiny(cfg).to(device)
        remember_source(model, dict(family=family, model=model_name, pretrained=None, image_size=cfg["image_size"],
                                    tokenizer={"kind": "clip_bpe", "context_length": cfg["context_length"]}))
        return ClipBundle(model, bpe_tokenizer(cfg["context_length"]), clip_transform(cfg["image_size"]),
                          family, cfg["image_size"])
    loaded = backend.load_pretrained(model_name, pretrained, device)
    remember_source(loaded.model, dict(family=family, model=model_name, pretrained=pretrained or None,
                                       image_size=loaded.image_size, tokenizer=loaded.tokenizer_spec))
    return ClipBundle(loaded.model, loaded.tokenizer, loaded.preprocess, family, loaded.image_size)


# --- rebuilding a saved model's architecture offline (e2_adapter.pretrained) -----------------------

def make_tokenizer(spec: dict) -> Callable[[list[str]], torch.Tensor]:
    """The tokenizer a saved model's config names: CLIP's BPE (``clip_bpe``) or a family's own
    (``kind`` is the family: its backend's ``tokenizer_from_spec``)."""
    kind = spec.get("kind")
    if kind == "clip_bpe":
        return bpe_tokenizer(int(spec["context_length"]))
    if kind in BACKENDS:
        return BACKENDS[kind].tokenizer_from_spec(spec)
    raise ValueError(f"unknown tokenizer kind {kind!r} in the saved config; expected clip_bpe or one of {FAMILIES}")


def architecture_of(model: nn.Module, family: str) -> dict:
    """What it takes to rebuild ``model``'s layers with no download: its constructor arguments, read
    from the model itself (the family's pretrained loaders need the internet; the saved weights do not)."""
    return backend_class(family)(model).architecture()


def build_architecture(family: str, model_name: str, image_size: int, arch: dict, tokenizer: dict,
                       device: str | torch.device = "cpu") -> ClipBundle:
    """A randomly initialised model of a saved architecture, with its tokenizer and preprocess."""
    if family not in BACKENDS:
        raise ValueError(f"unknown CLIP family {family!r} in the saved config; choose one of {FAMILIES}")
    tiny = tiny_config(model_name, image_size) if model_name in TINY_CONFIGS else None
    model, preprocess = BACKENDS[family].build_architecture(model_name, image_size, arch, tiny=tiny)
    return ClipBundle(model.to(device), make_tokenizer(tokenizer), preprocess, family, int(image_size))
