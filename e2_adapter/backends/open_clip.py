"""open_clip ``CLIP`` / ``CustomTextCLIP`` with a ``VisionTransformer`` tower (NLD or LND layout)."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .base import CLIP_VOCAB_SIZE, Loaded, UnsupportedModelError, clip_transform, describe, trim_after_end
from .conv_vit import ConvViTBackend


class OpenClipBackend(ConvViTBackend):
    """open_clip CLIP / CustomTextCLIP with a VisionTransformer tower."""

    family = "open_clip"

    @classmethod
    def claims(cls, model) -> bool:
        from open_clip.timm_model import TimmModel
        return (type(model).__module__.startswith("open_clip") and hasattr(model, "visual")
                and not isinstance(model.visual, TimmModel))  # timm towers: open_clip_timm.py

    def check(self) -> None:
        from open_clip.transformer import VisionTransformer
        tower = self.tower
        name = describe(self.model)
        if not isinstance(tower, VisionTransformer):
            kind = "ResNet (ModifiedResNet)" if type(tower).__name__ == "ModifiedResNet" else type(tower).__name__
            raise UnsupportedModelError(
                f"{name} has a {kind} image tower; E2 needs a ViT image tower (its selection tokens are "
                "tokens among the patch tokens, which a convolutional tower does not have).")
        if getattr(tower, "attn_pool", None) is None and getattr(tower, "pool_type", "tok") == "none":
            raise UnsupportedModelError(
                f"{name} has pool_type='none': its tower returns every token, not a pooled embedding, so there "
                "is no global embedding for E2 to keep.")
        if getattr(tower, "output_tokens", False):
            raise UnsupportedModelError(
                f"{name} has output_tokens=True (CoCa's captioning decoder reads the tower's tokens); E2's "
                "tower returns the global embedding only. Set model.visual.output_tokens = False before "
                "wrapping if only the contrastive embedding is used.")

    @property
    def pools_patches(self) -> bool:
        # an attention pooler (CoCa style, its parallel/cascade variants) or pool_type avg / none
        return getattr(self.tower, "attn_pool", None) is not None or getattr(self.tower, "pool_type", "tok") != "tok"

    def pool(self, x):
        if not self.pools_patches:
            return super().pool(x)
        return self.tower._pool(x)[0]  # open_clip's own pooling (attention pool, avg, final_ln_after_pool)

    # --- building and loading ----------------------------------------------------------------------
    @classmethod
    def build_tiny(cls, cfg):
        import open_clip
        if cls.tiny_tower(cfg, ("vit", "siglip")) == "siglip":  # open_clip builds SigLIP as a timm tower
            from .open_clip_timm import tiny_model
            return tiny_model(embed_dim=cfg["vision_width"], width=cfg["vision_width"], depth=cfg["vision_layers"],
                              image_size=cfg["image_size"], patch_size=cfg["patch_size"],
                              context_length=cfg["context_length"], seed=None)
        return open_clip.CLIP(
            embed_dim=cfg["embed_dim"],
            vision_cfg=dict(image_size=cfg["image_size"], patch_size=cfg["patch_size"], width=cfg["vision_width"],
                            layers=cfg["vision_layers"], head_width=cfg["vision_width"] // cfg["vision_heads"]),
            text_cfg=dict(context_length=cfg["context_length"], vocab_size=CLIP_VOCAB_SIZE, width=cfg["text_width"],
                          heads=cfg["text_heads"], layers=cfg["text_layers"]),
        )

    @classmethod
    def load_pretrained(cls, name, pretrained, device="cpu"):
        import open_clip
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None if pretrained in (None, "", "none") else pretrained, device=device)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return Loaded(model, open_clip.get_tokenizer(name), preprocess, int(size), {"kind": cls.family, "name": name})

    def architecture(self):
        return {}  # the model name (a tiny config or open_clip's own) rebuilds it

    @classmethod
    def build_architecture(cls, name, image_size, arch, tiny=None):
        if tiny is not None:
            return cls.build_tiny(tiny), clip_transform(image_size)
        import open_clip
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        return model, preprocess

    @classmethod
    def tokenizer_from_spec(cls, spec):
        import open_clip
        return open_clip.get_tokenizer(spec["name"])

    # --- the five steps and the text tower ---------------------------------------------------------
    def embed(self, images, **kwargs):
        x = super().embed(images)
        return self.tower.patch_dropout(x)  # keeps token 0 (CLS), drops patches while training

    def encode_text(self, tokens):
        model = self.model
        trimmed = trim_after_end(tokens, tokens.argmax(-1))  # argmax: the end token, where CLIP pools
        # open_clip's encode_text always adds the full-context positional embedding, so the short path
        # is spelled out here, for the plain CLIP text tower it applies to (causal, end-token pooling).
        plain = (hasattr(model, "token_embedding") and getattr(model, "attn_mask", None) is not None
                 and getattr(model, "text_pool_type", "argmax") == "argmax"
                 and getattr(model.transformer, "batch_first", False))
        if trimmed.shape[1] == tokens.shape[1] or not plain:
            return model.encode_text(tokens)
        n = trimmed.shape[1]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(trimmed).to(cast) + model.positional_embedding[:n].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
        x = x[torch.arange(x.shape[0], device=x.device), trimmed.argmax(-1)]
        proj = model.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj

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
