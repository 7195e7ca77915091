"""Hugging Face transformers ``Siglip2Model`` and ``Siglip2VisionModel`` (SigLIP 2, NaFlex).

The tower takes patches, not images: ``pixel_values`` [B, N, p*p*C] already cut into patches, a
``pixel_attention_mask`` [B, N] (1 on an image's patches, 0 on the padding after them) and each
image's patch grid ``spatial_shapes`` [B, 2], to which the position table is resized. Otherwise it is
SigLIP's tower: no class token, an attention-pooling head over the patches, no projection.

What the padding asks of E2: fusion never picks a padding patch, and every attention keeps ignoring
the padding, E2's tokens' included (the tokens themselves are always real). An image batch [B, 3, H, W]
(the trainer's, ``encode_image``'s) is cut into patches here as the Siglip2 image processor cuts them,
every patch real.
"""
from __future__ import annotations

import torch

from .base import UnsupportedModelError, describe
from .hf_siglip import HFSiglipBackend


def patchify(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, C, H, W] -> (pixel_values [B, N, p*p*C] in the Siglip2 processor's order (row-major patches,
    each row-major pixels, channels last), pixel_attention_mask [B, N] of ones, spatial_shapes [B, 2])."""
    b, c, h, w = images.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"images of {h} x {w} px do not divide into {patch_size}-px patches: resize them")
    gh, gw = h // patch_size, w // patch_size
    patches = images.reshape(b, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 3, 5, 1)
    pixel_values = patches.reshape(b, gh * gw, patch_size * patch_size * c)
    mask = torch.ones(b, gh * gw, dtype=torch.long, device=images.device)
    shapes = torch.tensor([[gh, gw]] * b, dtype=torch.long, device=images.device)
    return pixel_values, mask, shapes


class HFSiglip2Backend(HFSiglipBackend):
    """transformers Siglip2Model / Siglip2VisionModel (NaFlex: variable-length patch sequences with a mask)."""

    family = "hf_siglip2"
    rebuilds = {"Siglip2Model": "Siglip2Config", "Siglip2VisionModel": "Siglip2VisionConfig"}
    embed_inputs = ("pixel_attention_mask", "spatial_shapes")

    @classmethod
    def claims(cls, model) -> bool:
        return type(model).__module__.startswith("transformers") and type(model).__name__.startswith("Siglip2")

    @property
    def patch_mask(self):
        return getattr(self, "_patch_mask", None)

    def embed(self, images, pixel_attention_mask=None, spatial_shapes=None, **kwargs):
        if images.dim() == 4:  # an image batch: every image fills the grid, no padding
            images, pixel_attention_mask, spatial_shapes = patchify(images, self.tower.embeddings.patch_size)
        elif spatial_shapes is None:
            raise ValueError(f"{describe(self.model or self.tower)} got patches without spatial_shapes: pass "
                             "the Siglip2 processor's pixel_values, pixel_attention_mask and spatial_shapes together")
        self._pixel_mask = pixel_attention_mask  # the head's own mask argument, as given
        real = None if pixel_attention_mask is None else pixel_attention_mask.bool()
        self._patch_mask = None if real is None or bool(real.all()) else real
        return self.tower.embeddings(images.to(self.compute_weight().dtype), spatial_shapes)

    def run_blocks(self, x, start, end, attn_mask):
        if self._patch_mask is not None:
            attn_mask = self._with_padding(x, attn_mask)
        return super().run_blocks(x, start, end, attn_mask)

    def _with_padding(self, x, attn_mask):
        """[B, 1, L, L] additive mask: the given one (or none) with every padding key blocked."""
        inserted = x.shape[1] - self._patch_mask.shape[1]  # E2's tokens, always real, before the patches
        keys = torch.cat([self._patch_mask.new_ones(x.shape[0], inserted), self._patch_mask], dim=1)
        base = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device) if attn_mask is None else attn_mask
        return base[None, None].masked_fill(~keys[:, None, None, :], torch.finfo(x.dtype).min)

    def pool(self, x):
        return self.tower.head(self.tower.post_layernorm(x), self._pixel_mask)

    def check(self) -> None:
        super().check()
        if getattr(self.tower.embeddings, "patch_size", None) is None:
            raise UnsupportedModelError(f"{describe(self.model)} has no Siglip2 patch embedding (embeddings.patch_size)")

    def encode_image(self, images):
        if images.dim() != 4:
            raise ValueError("encode_image takes an image batch [B, 3, H, W]; call the model with the Siglip2 "
                             "processor's outputs for padded patch sequences")
        model = self.model if self.model is not None else self.tower
        pixel_values, mask, shapes = patchify(images, self.tower.embeddings.patch_size)
        inputs = dict(pixel_values=pixel_values, pixel_attention_mask=mask, spatial_shapes=shapes)
        out = model.get_image_features(**inputs) if hasattr(model, "get_image_features") else model(**inputs)
        return out if torch.is_tensor(out) else out.pooler_output


def tiny_model(vision_only: bool = False, width: int = 64, layers: int = 2, image_size: int = 32,
               patch_size: int = 8, context_length: int = 16, seed: int | None = 0):
    """A random ``Siglip2Model`` (or ``Siglip2VisionModel``) whose position table is the grid of
    ``image_size`` / ``patch_size`` (also the longest patch sequence it is given in tests)."""
    from transformers import Siglip2Config, Siglip2Model, Siglip2VisionConfig, Siglip2VisionModel
    if seed is not None:
        torch.manual_seed(seed)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
                  num_patches=(image_size // patch_size) ** 2, patch_size=patch_size)
    if vision_only:
        return Siglip2VisionModel(Siglip2VisionConfig(**vision)).eval()
    text = dict(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=context_length)
    return Siglip2Model(Siglip2Config(text_config=text, vision_config=vision)).eval()
