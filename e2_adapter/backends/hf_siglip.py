"""Hugging Face transformers ``SiglipModel`` and ``SiglipVisionModel``.

The vision tower has no class token (positions on the patches only) and no projection: its pooled
output, a learned probe attending over the normalised patches (``SiglipMultiheadAttentionPoolingHead``),
is the image embedding. In transformers 5 the tower is ``SiglipVisionModel`` itself (``SiglipModel``
holds one as ``vision_model``); in 4.x it is the ``SiglipVisionTransformer`` at ``.vision_model``.
"""
from __future__ import annotations

import torch

from .base import UnsupportedModelError, VisionBackend, describe
from .hf_clip import HFEncoderSteps


class HFSiglipBackend(HFEncoderSteps, VisionBackend):
    """transformers SiglipModel / SiglipVisionModel (attention-pooled, no class token; sigmoid loss)."""

    family = "hf_siglip"
    lora_targets = ("fc1", "fc2")  # each SiglipEncoderLayer's mlp
    zoo_family = "hf"
    rebuilds = {"SiglipModel": "SiglipConfig", "SiglipVisionModel": "SiglipVisionConfig"}
    tower_projects = True  # the pooled vector is the embedding: the tower alone gives it

    @classmethod
    def claims(cls, model) -> bool:
        name = type(model).__name__
        return type(model).__module__.startswith("transformers") and name.startswith("Siglip") \
            and not name.startswith("Siglip2")  # SigLIP 2 (NaFlex) is hf_siglip2's

    def check(self) -> None:
        name = describe(self.model)
        tower = self.tower
        if not all(hasattr(tower, a) for a in ("embeddings", "encoder", "post_layernorm")):
            raise UnsupportedModelError(f"{name} has no SigLIP vision tower (embeddings, encoder, post_layernorm); "
                                        "wrap a SiglipModel or SiglipVisionModel.")
        if getattr(tower, "head", None) is None:
            raise UnsupportedModelError(
                f"{name} was built with vision_use_head=False: its vision tower has no pooled embedding "
                "(pooler_output is None), so there is no global image embedding for E2 to keep.")

    @staticmethod
    def find_tower(model):
        if hasattr(model, "embeddings") and hasattr(model, "encoder"):
            return model  # transformers 5 SiglipVisionModel: the model is the tower
        return model.vision_model

    @property
    def width(self):
        return self.tower.post_layernorm.normalized_shape[0]

    @property
    def num_blocks(self):
        return len(self.tower.encoder.layers)

    @property
    def embed_dim(self):
        return self.width  # no projection

    @property
    def num_prefix_tokens(self):
        return 0  # no class token

    @property
    def pools_patches(self):
        return True

    def pre_norm(self, x):
        return x  # SigLIP has no pre-norm

    def pool(self, x):
        return self.tower.head(self.tower.post_layernorm(x))  # the attention-pooling probe over the patches

    def projection_weight(self):
        return None

    def project(self, pooled):
        return pooled

    def class_token(self):
        raise UnsupportedModelError(f"{describe(self.model or self.tower)} has no class token to start the "
                                    "selection tokens from; use token_init='normal' (the default)")

    def tower_output(self, out, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        return BaseModelOutputWithPooling(last_hidden_state=out.tokens, pooler_output=out.pooled)

    def encode_image(self, images):
        model = self.model if self.model is not None else self.tower
        if hasattr(model, "get_image_features"):
            out = model.get_image_features(pixel_values=images)
        else:
            out = model(pixel_values=images)
        return out if torch.is_tensor(out) else out.pooler_output

    def encode_text(self, tokens):
        if self.model is None or not hasattr(self.model, "get_text_features"):
            raise UnsupportedModelError(f"{describe(self.model or self.tower)} has no text tower")
        # SigLIP's text tower pools the last position and was trained on max-length padding with no
        # attention mask, so the padded ids go in as they are (no trimming, no mask).
        out = self.model.get_text_features(input_ids=tokens)
        return out if torch.is_tensor(out) else out.pooler_output


def tiny_model(vision_only: bool = False, width: int = 64, layers: int = 2, image_size: int = 32,
               patch_size: int = 8, context_length: int = 16, seed: int | None = 0):
    """A random ``SiglipModel`` (or ``SiglipVisionModel``) from a tiny ``SiglipConfig``, for tests."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel
    if seed is not None:
        torch.manual_seed(seed)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=2,
                  image_size=image_size, patch_size=patch_size)
    if vision_only:
        return SiglipVisionModel(SiglipVisionConfig(**vision)).eval()
    text = dict(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=context_length)
    return SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
