"""open_clip ``CLIP`` / ``CustomTextCLIP`` with a ``VisionTransformer`` tower (NLD or LND layout)."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .base import UnsupportedModelError, describe
from .conv_vit import ConvViTBackend


class OpenClipBackend(ConvViTBackend):
    family = "open_clip"

    @classmethod
    def claims(cls, model) -> bool:
        return type(model).__module__.startswith("open_clip") and hasattr(model, "visual")

    def check(self) -> None:
        from open_clip.transformer import VisionTransformer
        tower = self.tower
        name = describe(self.model)
        if not isinstance(tower, VisionTransformer):
            raise UnsupportedModelError(
                f"{name} has a {type(tower).__name__} image tower; E2 needs a ViT (VisionTransformer) tower "
                "with a class token. ResNet and timm towers are not supported.")
        if getattr(tower, "attn_pool", None) is not None:
            raise UnsupportedModelError(
                f"{name} pools its image tokens with attention (CoCa / SigLIP 'map' style); E2's global "
                "embedding is the class token, which such a model does not use.")
        if getattr(tower, "pool_type", "tok") != "tok":
            raise UnsupportedModelError(
                f"{name} pools with pool_type={tower.pool_type!r}; E2 needs class-token pooling ('tok').")
        if getattr(tower, "output_tokens", False):
            raise UnsupportedModelError(
                f"{name} has output_tokens=True; E2 drops patch tokens in its last block, so it cannot return "
                "them. Set model.visual.output_tokens = False before wrapping.")

    def embed(self, images, **kwargs):
        x = super().embed(images)
        return self.tower.patch_dropout(x)  # keeps token 0 (CLS), drops patches while training

    def run_blocks(self, x, start, end, attn_mask):
        transformer = self.tower.transformer
        lnd = not getattr(transformer, "batch_first", True)
        if lnd:
            x = x.transpose(0, 1)
        for block in list(transformer.resblocks)[start:end]:
            if getattr(transformer, "grad_checkpointing", False) and torch.is_grad_enabled():
                x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        return x.transpose(0, 1) if lnd else x
