"""Hugging Face transformers ``CLIPModel`` and ``CLIPVisionModelWithProjection`` (FashionCLIP-style
checkpoints included). The tower is ``model.vision_model``; the projection sits beside it."""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from .base import UnsupportedModelError, VisionBackend, describe, trim_after_end


@lru_cache(maxsize=None)
def _takes_causal_mask(layer_type: type) -> bool:
    return "causal_attention_mask" in inspect.signature(layer_type.forward).parameters


class HFClipBackend(VisionBackend):
    family = "hf"
    tower_projects = False  # vision_model returns pooler_output; the model applies visual_projection

    @classmethod
    def claims(cls, model) -> bool:
        return type(model).__module__.startswith("transformers") and (
            hasattr(model, "vision_model") or type(model).__name__.startswith("CLIP"))

    def check(self) -> None:
        name = describe(self.model)
        if not hasattr(self.model, "vision_model"):
            raise UnsupportedModelError(f"{name} has no vision_model; wrap a CLIPModel or CLIPVisionModelWithProjection.")
        if not hasattr(self.model, "visual_projection"):
            raise UnsupportedModelError(
                f"{name} has no visual_projection, so it has no joint image-text space for E2's losses; "
                "wrap a CLIPModel or CLIPVisionModelWithProjection.")
        tower = self.tower
        if not all(hasattr(tower, a) for a in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")) or \
                not hasattr(tower.embeddings, "class_embedding"):
            raise UnsupportedModelError(f"{name}'s vision tower is not a CLIP ViT with a class token.")

    @staticmethod
    def find_tower(model):
        return model.vision_model

    @property
    def width(self):
        return self.tower.embeddings.class_embedding.shape[0]

    @property
    def num_blocks(self):
        return len(self.tower.encoder.layers)

    @property
    def embed_dim(self):
        return self.model.visual_projection.out_features

    def compute_weight(self):
        return self.tower.embeddings.patch_embedding.weight

    def embed(self, images, interpolate_pos_encoding: bool = False, **kwargs):
        dtype = self.compute_weight().dtype
        return self.tower.embeddings(images.to(dtype), interpolate_pos_encoding=interpolate_pos_encoding)

    def pre_norm(self, x):
        return self.tower.pre_layrnorm(x)

    def run_blocks(self, x, start, end, attn_mask):
        mask = attn_mask[None, None] if attn_mask is not None else None  # HF wants [B, heads, L, L]
        for layer in list(self.tower.encoder.layers)[start:end]:
            # transformers 4.x layers also take a causal mask and return a tuple
            out = layer(x, mask, None) if _takes_causal_mask(type(layer)) else layer(x, mask)
            x = out[0] if isinstance(out, tuple) else out
        return x

    @property
    def final_norm(self):
        return self.tower.post_layernorm

    def projection_weight(self):
        return self.model.visual_projection.weight.t()

    def project(self, pooled):
        return self.model.visual_projection(pooled)

    def class_token(self):
        emb = self.tower.embeddings
        return emb.class_embedding + emb.position_embedding.weight[0]

    def tower_output(self, out, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        return BaseModelOutputWithPooling(last_hidden_state=out.tokens, pooler_output=out.pooled)

    def encode_image(self, images):
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=images)
            return out if torch.is_tensor(out) else out.pooler_output
        return self.model(pixel_values=images).image_embeds

    def encode_text(self, tokens):
        if not hasattr(self.model, "get_text_features"):
            raise UnsupportedModelError(f"{describe(self.model)} has no text tower")
        # CLIP BPE ids padded with 0 after the end token: attend up to and including the first end token.
        eot = self.model.config.text_config.eos_token_id
        first_end = (tokens == eot).int().argmax(-1, keepdim=True)
        tokens = trim_after_end(tokens, first_end)
        mask = (torch.arange(tokens.shape[1], device=tokens.device)[None] <= first_end).long()
        out = self.model.get_text_features(input_ids=tokens, attention_mask=mask)
        return out if torch.is_tensor(out) else out.pooler_output
