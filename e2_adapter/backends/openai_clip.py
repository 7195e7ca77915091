"""OpenAI CLIP as packaged by clip-anytorch (``clip.model.CLIP``); its transformer is LND throughout."""
from __future__ import annotations

from .base import CLIP_VOCAB_SIZE, Loaded, UnsupportedModelError, describe, trim_after_end
from .conv_vit import ConvViTBackend


def _tokenizer(context_length: int):
    import clip
    return lambda texts: clip.tokenize(texts, context_length=context_length, truncate=True)


class OpenAIClipBackend(ConvViTBackend):
    """OpenAI clip (clip-anytorch) CLIP with a ViT tower."""

    family = "openai"

    @classmethod
    def claims(cls, model) -> bool:
        return type(model).__module__ == "clip.model" and hasattr(model, "visual")

    def check(self) -> None:
        if not self._is_vit(self.tower):
            raise UnsupportedModelError(
                f"{describe(self.model)} has a {type(self.tower).__name__} image tower (a ResNet CLIP such as "
                "RN50); E2 needs a ViT tower with a class token.")

    # --- building and loading ----------------------------------------------------------------------
    @classmethod
    def build_tiny(cls, cfg):
        from clip.model import CLIP
        return CLIP(embed_dim=cfg["embed_dim"], image_resolution=cfg["image_size"],
                    vision_layers=cfg["vision_layers"], vision_width=cfg["vision_width"],
                    vision_patch_size=cfg["patch_size"], context_length=cfg["context_length"],
                    vocab_size=CLIP_VOCAB_SIZE, transformer_width=cfg["text_width"],
                    transformer_heads=cfg["text_heads"], transformer_layers=cfg["text_layers"])
        # clip.model.CLIP derives its vision heads itself (width // 64)

    @classmethod
    def load_pretrained(cls, name, pretrained, device="cpu"):
        import clip
        model, preprocess = clip.load(name, device=device, jit=False)
        model = model.float()  # train in fp32 + autocast; clip.load leaves fp16 weights on CUDA
        ctx = int(model.context_length)
        return Loaded(model, _tokenizer(ctx), preprocess, int(model.visual.input_resolution),
                      {"kind": cls.family, "context_length": ctx})

    def architecture(self):
        model = self.model
        v, t = model.visual, model.transformer
        if not self._is_vit(v):
            raise ValueError("only OpenAI CLIP ViTs can be saved (this one has a ResNet image tower)")
        return dict(embed_dim=int(model.text_projection.shape[1]), image_resolution=int(v.input_resolution),
                    vision_layers=len(v.transformer.resblocks), vision_width=int(v.conv1.out_channels),
                    vision_patch_size=int(v.conv1.kernel_size[0]), context_length=int(model.context_length),
                    vocab_size=int(model.vocab_size), transformer_width=int(t.width),
                    transformer_heads=int(t.resblocks[0].attn.num_heads), transformer_layers=int(t.layers))

    @classmethod
    def build_architecture(cls, name, image_size, arch, tiny=None):
        from clip.clip import _transform
        from clip.model import CLIP
        return CLIP(**arch), _transform(int(arch["image_resolution"]))

    @classmethod
    def tokenizer_from_spec(cls, spec):
        return _tokenizer(int(spec["context_length"]))

    # --- the five steps and the text tower ---------------------------------------------------------
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
