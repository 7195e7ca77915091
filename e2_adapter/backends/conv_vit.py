"""What open_clip's and OpenAI's ViT towers share: the same attribute names (conv1, class_embedding,
positional_embedding, ln_pre, transformer.resblocks, ln_post, proj) and the same CLIP-level API
(encode_image, encode_text). The two family files only add what differs."""
from __future__ import annotations

from torch import nn

from .base import VisionBackend, mha_cls_attention, patch_embed


class ConvViTBackend(VisionBackend):
    lora_targets = ("c_fc", "c_proj")  # each ResidualAttentionBlock's mlp

    @staticmethod
    def find_tower(model: nn.Module) -> nn.Module:
        return model.visual

    @property
    def width(self) -> int:
        return self.tower.conv1.out_channels

    @property
    def num_blocks(self) -> int:
        return len(self.tower.transformer.resblocks)

    @property
    def embed_dim(self) -> int:
        proj = self.tower.proj
        return proj.shape[1] if proj is not None else self.width

    def pre_norm(self, x):
        return self.tower.ln_pre(x)

    @property
    def final_norm(self):
        return self.tower.ln_post

    def projection_weight(self):
        return self.tower.proj

    def project(self, pooled):
        proj = self.tower.proj
        return pooled @ proj if proj is not None else pooled

    def class_token(self):
        return self.tower.class_embedding + self.tower.positional_embedding[0]

    def tower_output(self, out, **kwargs):
        return out.image

    def compute_weight(self):
        return self.tower.conv1.weight

    def embed(self, images, **kwargs):
        t = self.tower
        return patch_embed(t.conv1, t.class_embedding, t.positional_embedding, images)

    def encode_image(self, images):
        return self.model.encode_image(images)

    def encode_text(self, tokens):
        return self.model.encode_text(tokens)

    def token_embedding(self) -> nn.Embedding:
        model = self.model
        table = getattr(model, "token_embedding", None)
        if table is None:  # open_clip CustomTextCLIP keeps its TextTransformer under .text
            table = getattr(getattr(model, "text", None), "token_embedding", None)
        if not isinstance(table, nn.Embedding):
            raise self._missing(f"token_embedding for {type(model).__name__} (no token_embedding table: "
                                "a text tower built on an HF language model?)")
        return table

    def cls_attention(self, images):
        blocks = self.tower.transformer.resblocks
        return mha_cls_attention(getattr(blocks[-1], "attn", None), lambda: self.encode_image(images))

    @staticmethod
    def _is_vit(tower: nn.Module) -> bool:
        return all(hasattr(tower, a) for a in ("conv1", "class_embedding", "positional_embedding", "transformer"))
