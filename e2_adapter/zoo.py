"""One creation API for the CLIP models e2-adapter works with, pretrained or randomly initialised.

Model sizes are data (``TINY_CONFIGS``), as in open_clip's ``model_configs``: the tiny ones let the
tests, the demo and CI run on a CPU with no downloads. Real checkpoints go through each family's
own loader (``open_clip.create_model_and_transforms``, ``clip.load``, ``CLIPModel.from_pretrained``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

FAMILIES = ("open_clip", "openai", "hf")

# Small ViT CLIPs for CPU work. Depth 6 keeps E2's layout meaningful (fusion after blocks 4 and 5).
TINY_CONFIGS: dict[str, dict] = {
    "tiny": dict(embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=6,
                 vision_heads=2, context_length=32, text_width=64, text_layers=2, text_heads=2),
    # The demo's model: 64 px images in a 4 x 4 grid of 16 px patches (ViT-B/32's 7 x 7 grid, scaled down).
    "demo": dict(embed_dim=64, image_size=64, patch_size=16, vision_width=96, vision_layers=6,
                 vision_heads=3, context_length=48, text_width=64, text_layers=2, text_heads=2),
    "small": dict(embed_dim=128, image_size=64, patch_size=8, vision_width=128, vision_layers=6,
                  vision_heads=4, context_length=64, text_width=128, text_layers=4, text_heads=4),
}
VOCAB_SIZE = 49408  # CLIP's BPE vocabulary, shared by all three families


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
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
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


def bpe_tokenizer(context_length: int) -> Callable[[list[str]], torch.Tensor]:
    """CLIP's BPE (the vocabulary open_clip ships), truncating to the context length."""
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer(context_length=context_length)


def clip_transform(image_size: int) -> Callable:
    """CLIP's evaluation transform (resize, centre crop, CLIP mean/std) from open_clip."""
    from open_clip import image_transform
    return image_transform(image_size, is_train=False)


def _tiny_open_clip(cfg: dict) -> nn.Module:
    import open_clip
    return open_clip.CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=dict(image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["vision_width"],
                        layers=cfg["vision_layers"], head_width=cfg["vision_width"] // cfg["vision_heads"]),
        text_cfg=dict(context_length=cfg["context_length"], vocab_size=VOCAB_SIZE, width=cfg["text_width"],
                      heads=cfg["text_heads"], layers=cfg["text_layers"]),
    )


def _tiny_openai(cfg: dict) -> nn.Module:
    from clip.model import CLIP
    model = CLIP(embed_dim=cfg["embed_dim"], image_resolution=cfg["image_size"],
                 vision_layers=cfg["vision_layers"], vision_width=cfg["vision_width"],
                 vision_patch_size=cfg["patch_size"], context_length=cfg["context_length"],
                 vocab_size=VOCAB_SIZE, transformer_width=cfg["text_width"],
                 transformer_heads=cfg["text_heads"], transformer_layers=cfg["text_layers"])
    return model  # clip.model.CLIP derives its vision heads itself (width // 64)


def _tiny_hf(cfg: dict) -> nn.Module:
    from transformers import CLIPConfig, CLIPModel
    config = CLIPConfig(
        projection_dim=cfg["embed_dim"],
        text_config=dict(vocab_size=VOCAB_SIZE, hidden_size=cfg["text_width"], intermediate_size=4 * cfg["text_width"],
                         num_hidden_layers=cfg["text_layers"], num_attention_heads=cfg["text_heads"],
                         max_position_embeddings=cfg["context_length"], bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=0),
        vision_config=dict(hidden_size=cfg["vision_width"], intermediate_size=4 * cfg["vision_width"],
                           num_hidden_layers=cfg["vision_layers"], num_attention_heads=cfg["vision_heads"],
                           image_size=cfg["image_size"], patch_size=cfg["patch_size"]),
    )
    return CLIPModel(config)


_TINY_BUILDERS = {"open_clip": _tiny_open_clip, "openai": _tiny_openai, "hf": _tiny_hf}


def create_clip(family: str = "open_clip", model_name: str = "tiny", pretrained: str | None = None,
                image_size: int | None = None, device: str | torch.device = "cpu", seed: int | None = None) -> ClipBundle:
    """Build a CLIP of the given family.

    ``model_name`` is a key of ``TINY_CONFIGS`` (random init; ``pretrained`` must be None) or the
    family's own model name (``ViT-B-32`` for open_clip, ``ViT-B/32`` for openai, a hub id or local
    folder for hf), which may need the internet the first time.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown CLIP family {family!r}; choose one of {FAMILIES}")
    if seed is not None:
        torch.manual_seed(seed)
    if model_name in TINY_CONFIGS:
        if pretrained not in (None, "", "none"):
            raise ValueError(f"tiny config {model_name!r} has no pretrained weights; use --pretrained none "
                             "or load a folder written by e2_adapter.save_pretrained with --checkpoint")
        cfg = tiny_config(model_name, image_size)
        model = _TINY_BUILDERS[family](cfg).to(device)
        remember_source(model, dict(family=family, model=model_name, pretrained=None, image_size=cfg["image_size"],
                                    tokenizer={"kind": "clip_bpe", "context_length": cfg["context_length"]}))
        return ClipBundle(model, bpe_tokenizer(cfg["context_length"]), clip_transform(cfg["image_size"]),
                          family, cfg["image_size"])
    bundle = _create_pretrained(family, model_name, pretrained, device)
    remember_source(bundle.model, dict(family=family, model=model_name, pretrained=pretrained or None,
                                       image_size=bundle.image_size, tokenizer=_tokenizer_spec(family, model_name, bundle.model)))
    return bundle


def _create_pretrained(family: str, model_name: str, pretrained: str | None, device) -> ClipBundle:
    if family == "open_clip":
        import open_clip
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=None if pretrained in (None, "", "none") else pretrained, device=device)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return ClipBundle(model, open_clip.get_tokenizer(model_name), preprocess, family, int(size))
    if family == "openai":
        import clip
        model, preprocess = clip.load(model_name, device=device, jit=False)
        model = model.float()  # train in fp32 + autocast; clip.load leaves fp16 weights on CUDA
        ctx = model.context_length
        return ClipBundle(model, lambda texts: clip.tokenize(texts, context_length=ctx, truncate=True),
                          preprocess, family, model.visual.input_resolution)
    from transformers import CLIPModel
    model = CLIPModel.from_pretrained(model_name).to(device)
    size = model.config.vision_config.image_size
    return ClipBundle(model, bpe_tokenizer(model.config.text_config.max_position_embeddings),
                      clip_transform(size), family, size)


# --- rebuilding a saved model's architecture offline (e2_adapter.pretrained) -----------------------

def _tokenizer_spec(family: str, model_name: str, model: nn.Module) -> dict:
    if family == "open_clip":
        return {"kind": "open_clip", "name": model_name}
    if family == "openai":
        return {"kind": "openai", "context_length": int(model.context_length)}
    return {"kind": "clip_bpe", "context_length": int(model.config.text_config.max_position_embeddings)}


def make_tokenizer(spec: dict) -> Callable[[list[str]], torch.Tensor]:
    """The tokenizer a saved model's config names (see ``_tokenizer_spec``)."""
    kind = spec.get("kind")
    if kind == "clip_bpe":
        return bpe_tokenizer(int(spec["context_length"]))
    if kind == "open_clip":
        import open_clip
        return open_clip.get_tokenizer(spec["name"])
    if kind == "openai":
        import clip
        ctx = int(spec["context_length"])
        return lambda texts: clip.tokenize(texts, context_length=ctx, truncate=True)
    raise ValueError(f"unknown tokenizer kind {kind!r} in the saved config; expected clip_bpe, open_clip or openai")


def architecture_of(model: nn.Module, family: str) -> dict:
    """What it takes to rebuild ``model``'s layers with no download: its constructor arguments, read
    from the model itself (the family's pretrained loaders need the internet; the saved weights do not)."""
    if family == "openai":
        v, t = model.visual, model.transformer
        if not hasattr(v, "conv1"):
            raise ValueError("only OpenAI CLIP ViTs can be saved (this one has a ResNet image tower)")
        return dict(embed_dim=int(model.text_projection.shape[1]), image_resolution=int(v.input_resolution),
                    vision_layers=len(v.transformer.resblocks), vision_width=int(v.conv1.out_channels),
                    vision_patch_size=int(v.conv1.kernel_size[0]), context_length=int(model.context_length),
                    vocab_size=int(model.vocab_size), transformer_width=int(t.width),
                    transformer_heads=int(t.resblocks[0].attn.num_heads), transformer_layers=int(t.layers))
    if family == "hf":
        return {"config": model.config.to_dict(), "class": type(model).__name__}
    return {}  # open_clip: the model name (a tiny config or open_clip's own) rebuilds it


def build_architecture(family: str, model_name: str, image_size: int, arch: dict, tokenizer: dict,
                       device: str | torch.device = "cpu") -> ClipBundle:
    """A randomly initialised model of a saved architecture, with its tokenizer and preprocess."""
    if family not in FAMILIES:
        raise ValueError(f"unknown CLIP family {family!r} in the saved config; choose one of {FAMILIES}")
    if family == "open_clip":
        if model_name in TINY_CONFIGS:
            model = _tiny_open_clip(tiny_config(model_name, image_size))
            preprocess = clip_transform(image_size)
        else:
            import open_clip
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    elif family == "openai":
        from clip.clip import _transform
        from clip.model import CLIP
        model, preprocess = CLIP(**arch), _transform(int(arch["image_resolution"]))
    else:
        import transformers
        configs = {"CLIPModel": "CLIPConfig", "CLIPVisionModelWithProjection": "CLIPVisionConfig",
                   "SiglipModel": "SiglipConfig", "SiglipVisionModel": "SiglipVisionConfig"}
        name = arch.get("class", "CLIPModel")
        if name not in configs:
            raise ValueError(f"saved hf class {name!r} is not a CLIP / SigLIP class e2-adapter rebuilds")
        cls, config_cls = getattr(transformers, name), getattr(transformers, configs[name])
        model, preprocess = cls(config_cls.from_dict(arch["config"])), clip_transform(image_size)
    return ClipBundle(model.to(device), make_tokenizer(tokenizer), preprocess, family, int(image_size))
