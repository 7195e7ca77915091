"""Hugging Face transformers ``CLIPModel`` and ``CLIPVisionModelWithProjection`` (FashionCLIP-style
checkpoints included). The tower is ``model.vision_model``; the projection sits beside it."""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from .base import (CLIP_VOCAB_SIZE, Loaded, UnsupportedModelError, VisionBackend, bpe_tokenizer, clip_transform,
                   describe, trim_after_end)



@lru_cache(maxsize=None)
def _takes_causal_mask(layer_type: type) -> bool:
    return "causal_attention_mask" in inspect.signature(layer_type.forward).parameters


class HFEncoderSteps:
    """The tower steps transformers' CLIP and SigLIP vision models share (``embeddings``,
    ``encoder.layers``, ``post_layernorm``); their backends differ in pre-norm, pooling and projection."""

    def compute_weight(self):
        return self.tower.embeddings.patch_embedding.weight

    def embed(self, images, interpolate_pos_encoding: bool = False, **kwargs):
        dtype = self.compute_weight().dtype
        return self.tower.embeddings(images.to(dtype), interpolate_pos_encoding=interpolate_pos_encoding)

    def run_blocks(self, x, start, end, attn_mask):
        # HF wants [B, heads, L, L] (broadcast over the heads; per image when the backend adds padding)
        mask = attn_mask if attn_mask is None or attn_mask.dim() == 4 else attn_mask[None, None]
        for layer in list(self.tower.encoder.layers)[start:end]:
            # transformers 4.x layers also take a causal mask and return a tuple
            out = layer(x, mask, None) if _takes_causal_mask(type(layer)) else layer(x, mask)
            x = out[0] if isinstance(out, tuple) else out
        return x

    @property
    def final_norm(self):
        return self.tower.post_layernorm


class HFClipBackend(HFEncoderSteps, VisionBackend):
    """transformers CLIPModel / CLIPVisionModelWithProjection."""

    family = "hf"
    tower_projects = False  # vision_model returns pooler_output; the model applies visual_projection
    lora_targets = ("fc1", "fc2")  # each CLIPEncoderLayer's mlp
    rebuilds = {"CLIPModel": "CLIPConfig", "CLIPVisionModelWithProjection": "CLIPVisionConfig"}

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

    def pre_norm(self, x):
        return self.tower.pre_layrnorm(x)

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

    def token_embedding(self):
        text = getattr(self.model, "text_model", None)
        if text is None:
            raise self._missing(f"token_embedding for {type(self.model).__name__} (it has no text tower)")
        return text.embeddings.token_embedding

    def cls_attention(self, images):
        model = self.model
        # sdpa / flash attention return no weights: switch to eager for the call, then back
        impl = getattr(model.config, "_attn_implementation", None)
        switch = impl not in (None, "eager") and hasattr(model, "set_attn_implementation")
        if switch:
            model.set_attn_implementation("eager")
        try:
            out = model.vision_model(pixel_values=images.to(self.compute_weight().dtype), output_attentions=True)
        finally:
            if switch:
                model.set_attn_implementation(impl)
        if not out.attentions or out.attentions[-1] is None:
            raise ValueError("the transformers model returned no attentions; load it with attn_implementation='eager'")
        return out.attentions[-1].float().mean(1)[:, 0, 1:]

    # --- building and loading ----------------------------------------------------------------------
    @classmethod
    def build_tiny(cls, cfg):
        from transformers import CLIPConfig, CLIPModel
        if cls.tiny_tower(cfg, ("vit", "siglip")) == "siglip":  # transformers' SiglipModel
            from .hf_siglip import tiny_model
            return tiny_model(width=cfg["vision_width"], layers=cfg["vision_layers"], image_size=cfg["image_size"],
                              patch_size=cfg["patch_size"], context_length=cfg["context_length"], seed=None)
        config = CLIPConfig(
            projection_dim=cfg["embed_dim"],
            text_config=dict(vocab_size=CLIP_VOCAB_SIZE, hidden_size=cfg["text_width"],
                             intermediate_size=4 * cfg["text_width"], num_hidden_layers=cfg["text_layers"],
                             num_attention_heads=cfg["text_heads"], max_position_embeddings=cfg["context_length"],
                             bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
            vision_config=dict(hidden_size=cfg["vision_width"], intermediate_size=4 * cfg["vision_width"],
                               num_hidden_layers=cfg["vision_layers"], num_attention_heads=cfg["vision_heads"],
                               image_size=cfg["image_size"], patch_size=cfg["patch_size"]),
        )
        return CLIPModel(config)

    @classmethod
    def load_pretrained(cls, name, pretrained, device="cpu"):
        from transformers import CLIPModel
        model = CLIPModel.from_pretrained(name).to(device)
        size = model.config.vision_config.image_size
        ctx = int(model.config.text_config.max_position_embeddings)
        return Loaded(model, bpe_tokenizer(ctx), clip_transform(size), size,
                      {"kind": "clip_bpe", "context_length": ctx})

    def architecture(self):
        return {"config": self.model.config.to_dict(), "class": type(self.model).__name__}

    @classmethod
    def build_architecture(cls, name, image_size, arch, tiny=None):
        import transformers
        from . import BACKENDS
        # Every backend the hf family builds (CLIP here, SigLIP in hf_siglip) names the classes it rebuilds.
        classes = {name: config for b in BACKENDS.values() if (b.zoo_family or b.family) == cls.family
                   for name, config in b.rebuilds.items()}
        class_name = arch.get("class", "CLIPModel")
        if class_name not in classes:
            raise ValueError(f"saved hf class {class_name!r} is not one e2-adapter rebuilds ({sorted(classes)})")
        config = getattr(transformers, classes[class_name]).from_dict(arch["config"])
        return getattr(transformers, class_name)(config), clip_transform(image_size)
