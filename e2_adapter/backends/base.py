"""The one interface every CLIP family answers, so the E2 forward (tower.py) knows no family.

A backend wraps a *model* (the object the user passed to ``wrap``) and exposes its vision tower as
five steps: embed the image into tokens, the pre-norm, run blocks [start, end), the final norm and
the projection. Block modules are looked up on every call, never cached, so peft LoRA layers
injected before or after wrapping are always the ones that run.

``at_tower(tower)`` gives a backend rooted at one tower module and nothing else: the installed
forward builds one for the module it is called on, so a DataParallel replica runs its own weights.

Besides the five steps, a backend is the one place that describes its family for everything above
it (the zoo, the trainer, the visualiser, the integrations), so no other module names a family:

    lora_targets                     peft target_modules for the family's MLP linears
    build_tiny(cfg)                  a randomly initialised model from a ``zoo.TINY_CONFIGS`` entry
    load_pretrained(name, weights)   the family's own loader -> ``Loaded`` (model, tokenizer, ...)
    architecture() / build_architecture(...) / tokenizer_from_spec(spec)
                                     rebuild a saved model offline (``e2_adapter.pretrained``)
    token_embedding()                the text tower's token-embedding table (pseudo-word injection)
    cls_attention(images)            the last block's CLS-to-patch attention (the baseline's maps)

These are optional: the defaults raise ``NotImplementedError`` naming the family and the capability,
so a new family can start with the five steps and ``encode_*`` and add the rest as it needs them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, NamedTuple

import torch
from torch import nn


class UnsupportedModelError(TypeError):
    """The model is not a CLIP vision transformer that E2 can be laid into."""


# CLIP's BPE vocabulary size, shared by the open_clip, OpenAI and HF CLIP text towers.
CLIP_VOCAB_SIZE = 49408
# CLIP's image normalisation (OpenAI's, also open_clip's default and HF CLIPImageProcessor's).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Tokenizer = Callable[[list[str]], torch.Tensor]


class Loaded(NamedTuple):
    """What a family's pretrained loader gives back (``zoo.create_clip`` makes a ClipBundle of it)."""
    model: nn.Module
    tokenizer: Tokenizer
    preprocess: Callable | None
    image_size: int
    tokenizer_spec: dict  # how to rebuild the tokenizer offline: see ``VisionBackend.tokenizer_from_spec``


class VisionBackend(ABC):
    family: ClassVar[str]
    # peft ``target_modules`` when a run asks for LoRA without naming targets: the MLP linears of
    # every transformer block (both towers), the choice that keeps attention, and so E2's q.k, as is.
    lora_targets: ClassVar[tuple[str, ...]] = ()
    # The e2_adapter.zoo family that creates this backend's models (save_pretrained records it); most
    # backends are their own, the timm-tower and SigLIP backends belong to open_clip and hf.
    zoo_family: ClassVar[str | None] = None
    # transformers backends: the model classes the zoo rebuilds from a saved config, with their config class
    rebuilds: ClassVar[dict[str, str]] = {}
    # Whether the tower's own forward returns the projected embedding (open_clip, OpenAI) or the
    # normalised CLS that the model projects outside the tower (HF): a tower-rooted backend can only
    # project in the first case.
    tower_projects: ClassVar[bool] = True
    # Keyword inputs of the tower's own forward that ``embed`` takes (the patched forward passes them on).
    embed_inputs: ClassVar[tuple[str, ...]] = ("interpolate_pos_encoding",)

    def __init__(self, model: nn.Module | None, tower: nn.Module | None = None):
        self.model = model
        self._tower = tower

    @classmethod
    def at_tower(cls, tower: nn.Module) -> "VisionBackend":
        """A backend for this tower alone (its model is not known: no encode_image / encode_text)."""
        return cls(None, tower)

    # --- detection -------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def claims(cls, model: nn.Module) -> bool:
        """True if ``model`` belongs to this family (supported or not: check() says why not)."""

    @abstractmethod
    def check(self) -> None:
        """Raise UnsupportedModelError naming the model and the reason if E2 cannot be laid in."""

    # --- the tower -------------------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def find_tower(model: nn.Module) -> nn.Module:
        """The model's vision tower module: it gets the ``e2`` child and E2's forward."""

    @property
    def tower(self) -> nn.Module:
        return self._tower if self._tower is not None else self.find_tower(self.model)

    @property
    @abstractmethod
    def width(self) -> int: ...

    @property
    @abstractmethod
    def num_blocks(self) -> int: ...

    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @abstractmethod
    def embed(self, images: torch.Tensor, **kwargs) -> torch.Tensor:
        """Images -> [B, P+N, W] tokens: the ``num_prefix_tokens`` P (CLS, registers) first, then the
        N patches, positions added, before the pre-norm."""

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches in ``embed``'s output: 1 (the class token) for CLIP towers, 0 for a
        tower without one (SigLIP), 1 + registers for some timm towers. E2's tokens go right after them."""
        return 1

    @property
    def patch_mask(self) -> torch.Tensor | None:
        """[B, N] bool, False on padding patches, for towers that take variable-length patch sequences
        (set by ``embed``); None when every patch is real. Fusion never picks a padding patch."""
        return None

    @property
    def pools_patches(self) -> bool:
        """True when the global embedding is pooled over the patch tokens (average, attention probe)
        rather than read off the class token: then E2 can never drop the patches."""
        return False

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens after the last block with E2's removed ([B, P+N, W], or [B, P, W] once the
        patches were dropped) -> the tower's pooled vector, what ``project`` takes. The default: the
        final norm of the class token."""
        return self.final_norm(x[:, 0])

    @abstractmethod
    def pre_norm(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def run_blocks(self, x: torch.Tensor, start: int, end: int, attn_mask: torch.Tensor | None) -> torch.Tensor:
        """Run blocks [start, end) on NLD tokens; ``attn_mask`` is additive [L, L] or None."""

    @property
    @abstractmethod
    def final_norm(self) -> nn.Module: ...

    @abstractmethod
    def projection_weight(self) -> torch.Tensor | None:
        """The global projection as a [W, D] matrix (None if the tower has none)."""

    @abstractmethod
    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """Normalised CLS [B, W] -> joint space [B, D], with the model's own (pretrained) projection."""

    @abstractmethod
    def class_token(self) -> torch.Tensor:
        """The class embedding plus its positional embedding, [W]: the start for selection tokens
        (``token_init="cls"``); a tower without a class token raises UnsupportedModelError."""

    @abstractmethod
    def tower_output(self, out: Any, **kwargs) -> Any:
        """What the patched tower forward returns, in the family's own format."""

    # --- the whole CLIP, for trainers and evaluators -------------------------------------------
    @abstractmethod
    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...

    @property
    def logit_scale(self) -> nn.Parameter | None:
        return getattr(self.model, "logit_scale", None)

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """SigLIP's learned bias of the pairwise sigmoid logits (None for CLIP)."""
        return getattr(self.model, "logit_bias", None)

    @property
    def loss_family(self) -> str:
        """The contrastive loss the model was pre-trained with, which E2's losses follow: "sigmoid"
        (SigLIP's pairwise loss; the model has a logit bias) or "softmax" (CLIP's InfoNCE)."""
        return "sigmoid" if self.logit_bias is not None else "softmax"

    @abstractmethod
    def compute_weight(self) -> torch.Tensor:
        """A weight the tower computes with (the patch embedding): its dtype is the activations' dtype.

        Not the first parameter: fp16 converters (``clip.model.convert_weights``, open_clip's
        ``convert_weights_to_lp``) leave ``class_embedding``, positions and norms in fp32."""

    def parameter_dtype(self) -> torch.dtype:
        return self.compute_weight().dtype

    def parameter_device(self) -> torch.device:
        return self.compute_weight().device

    # --- the family beyond one model (optional; see the module docstring) -------------------------
    @classmethod
    def _missing(cls, what: str) -> NotImplementedError:
        return NotImplementedError(f"the {cls.family} backend does not implement {what}")

    @classmethod
    def build_tiny(cls, cfg: dict) -> nn.Module:
        """A randomly initialised model of this family from a ``zoo.TINY_CONFIGS`` entry (keys
        embed_dim, image_size, patch_size, vision_width/layers/heads, context_length, text_width/layers/heads;
        ``tower``: "vit" when absent, or "siglip" for the families that build one)."""
        raise cls._missing("build_tiny (tiny random models)")

    @classmethod
    def tiny_tower(cls, cfg: dict, supported: tuple[str, ...] = ("vit",)) -> str:
        """The tiny config's tower layout, refused with a clear error when this family cannot build it."""
        tower = cfg.get("tower", "vit")
        if tower not in supported:
            raise ValueError(f"the {cls.family} family cannot build a tiny {tower!r} tower (it builds "
                             f"{', '.join(supported)}); use a family that has one, e.g. --family open_clip")
        return tower

    @classmethod
    def load_pretrained(cls, name: str, pretrained: str | None, device: str | torch.device = "cpu") -> Loaded:
        """The family's own loader for a named model (may download the first time)."""
        raise cls._missing("load_pretrained (named pretrained models)")

    def architecture(self) -> dict:
        """What it takes to rebuild this model's layers offline (JSON-able); ``{}`` if its name is enough."""
        raise self._missing("architecture (save_pretrained)")

    @classmethod
    def build_architecture(cls, name: str, image_size: int, arch: dict,
                           tiny: dict | None = None) -> tuple[nn.Module, Callable | None]:
        """(randomly initialised model, preprocess) from what ``architecture()`` recorded; ``tiny`` is
        the ``TINY_CONFIGS`` entry when ``name`` is one."""
        raise cls._missing("build_architecture (from_pretrained)")

    @classmethod
    def tokenizer_from_spec(cls, spec: dict) -> Tokenizer:
        """The tokenizer a ``Loaded.tokenizer_spec`` whose ``kind`` is this family describes."""
        raise cls._missing("tokenizer_from_spec")

    def token_embedding(self) -> nn.Embedding:
        """The text tower's token-embedding table: a forward hook on it replaces a placeholder's
        embedding (Pic2Word / SEARLE pseudo words), and ``encode_text`` then runs unchanged."""
        raise self._missing("token_embedding (pseudo-word injection)")

    def cls_attention(self, images: torch.Tensor) -> torch.Tensor:
        """Last block's attention from CLS to the patches, averaged over heads: [B, N] (each row sums
        to the CLS row's patch share). For an unwrapped model; the caller sets eval / inference mode."""
        raise self._missing("cls_attention (attention maps)")


def patch_embed(conv1: nn.Conv2d, class_embedding: torch.Tensor, positional_embedding: torch.Tensor,
                images: torch.Tensor) -> torch.Tensor:
    """The ViT stem shared by open_clip and OpenAI CLIP: conv patches, CLS first, positions added."""
    x = conv1(images.to(conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, W]
    cls = class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    if x.shape[1] != positional_embedding.shape[0]:
        raise ValueError(f"image gives {x.shape[1] - 1} patches but the model has positions for "
                         f"{positional_embedding.shape[0] - 1}: resize images to the model's input size")
    return x + positional_embedding.to(x.dtype)


def trim_after_end(tokens: torch.Tensor, end_positions: torch.Tensor) -> torch.Tensor:
    """Drop the padding columns after the batch's last end token.

    CLIP's text attention is causal and pools at the end token, so nothing after it changes the
    embedding; a tag such as "FW2017" is 4 tokens of a 77-token context, and running the text tower
    on the padding made E2's region loss (one text per distinct tag value) cost more than the captions.
    """
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return tokens  # a traced graph must not bake in this batch's length; the full context is the same
    length = int(end_positions.max()) + 1 if tokens.numel() else tokens.shape[1]
    return tokens[:, :length]


def bpe_tokenizer(context_length: int) -> Tokenizer:
    """CLIP's BPE (the vocabulary open_clip ships, so it works offline), truncating to the context length."""
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer(context_length=context_length)


def clip_transform(image_size: int) -> Callable:
    """CLIP's evaluation transform (resize, centre crop, CLIP mean/std), as open_clip builds it."""
    from open_clip import image_transform
    return image_transform(image_size, is_train=False)


def mha_cls_attention(attn: nn.MultiheadAttention, run: Callable[[], Any]) -> torch.Tensor:
    """CLS-to-patch weights of ``attn`` during ``run()``, for blocks that call an ``nn.MultiheadAttention``
    with ``need_weights=False``: a forward pre-hook turns the weights on and a forward hook keeps
    them; the block's output is unchanged. [B, N] for NLD and LND layouts alike."""
    if not isinstance(attn, nn.MultiheadAttention):
        raise ValueError(f"the last block's attention is a {type(attn).__name__}, not nn.MultiheadAttention")
    caught: list[torch.Tensor] = []

    def pre_hook(module, args, kwargs):
        kwargs["need_weights"] = True
        kwargs["average_attn_weights"] = True
        return args, kwargs

    def hook(module, args, output):
        caught.append(output[1])

    handles = [attn.register_forward_pre_hook(pre_hook, with_kwargs=True), attn.register_forward_hook(hook)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    if len(caught) != 1 or caught[0] is None:
        raise RuntimeError("could not catch the last block's attention weights")
    return caught[0].float()[:, 0, 1:]


def describe(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__name__}"
