"""The one interface every CLIP family answers, so the E2 forward (tower.py) knows no family.

A backend wraps a *model* (the object the user passed to ``wrap``) and exposes its vision tower as
five steps: embed the image into tokens, the pre-norm, run blocks [start, end), the final norm and
the projection. Block modules are looked up on every call, never cached, so peft LoRA layers
injected before or after wrapping are always the ones that run.

``at_tower(tower)`` gives a backend rooted at one tower module and nothing else: the installed
forward builds one for the module it is called on, so a DataParallel replica runs its own weights.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn


class UnsupportedModelError(TypeError):
    """The model is not a CLIP vision transformer that E2 can be laid into."""


class VisionBackend(ABC):
    family: ClassVar[str]
    # The e2_adapter.zoo family that creates this backend's models (save_pretrained records it); most
    # backends are their own, the timm-tower and SigLIP backends belong to open_clip and hf.
    zoo_family: ClassVar[str | None] = None
    # Whether the tower's own forward returns the projected embedding (open_clip, OpenAI) or the
    # normalised CLS that the model projects outside the tower (HF): a tower-rooted backend can only
    # project in the first case.
    tower_projects: ClassVar[bool] = True

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


def describe(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__name__}"
