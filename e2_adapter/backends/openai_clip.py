"""OpenAI CLIP as packaged by clip-anytorch (``clip.model.CLIP``); its transformer is LND throughout."""
from __future__ import annotations

from .base import UnsupportedModelError, describe, trim_after_end
from .conv_vit import ConvViTBackend


class OpenAIClipBackend(ConvViTBackend):
    family = "openai"

    @classmethod
    def claims(cls, model) -> bool:
        return type(model).__module__ == "clip.model" and hasattr(model, "visual")

    def check(self) -> None:
        if not self._is_vit(self.tower):
            raise UnsupportedModelError(
                f"{describe(self.model)} has a {type(self.tower).__name__} image tower (a ResNet CLIP such as "
                "RN50); E2 needs a ViT tower with a class token.")

    def encode_text(self, tokens):
        # clip-anytorch slices its causal mask and positional embedding to the input's length.
        return self.model.encode_text(trim_after_end(tokens, tokens.argmax(-1)))

    def run_blocks(self, x, start, end, attn_mask):
        x = x.transpose(0, 1)  # NLD -> LND
        for block in list(self.tower.transformer.resblocks)[start:end]:
            if attn_mask is None:
                x = block(x)
            else:  # the block's forward takes no mask argument, so run its two halves here
                h = block.ln_1(x)
                x = x + block.attn(h, h, h, need_weights=False, attn_mask=attn_mask.to(h.dtype))[0]
                x = x + block.mlp(block.ln_2(x))
        return x.transpose(0, 1)
