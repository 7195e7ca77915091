"""OpenAI CLIP (``clip.model.CLIP`` of clip-anytorch) and copies of it vendored under other module
names (Pic2Word's ``model.model``, many research repos' ``third_party/clip``); LND throughout.

The family is recognised by structure, not by module path: a model with ``encode_image`` /
``encode_text`` whose ``visual`` tower has OpenAI's ViT attributes (``conv1``, ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks``, ``ln_post``, ``proj``). open_clip
and transformers models have their own backends and are left to them.
"""
from __future__ import annotations

from torch import nn

from .base import CLIP_VOCAB_SIZE, Loaded, UnsupportedModelError, describe, trim_after_end
from .conv_vit import ConvViTBackend

VIT_ATTRIBUTES = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj")
BLOCK_ATTRIBUTES = ("ln_1", "attn", "ln_2", "mlp")
# Module roots other backends own: their towers have the same attribute names but other block APIs.
OTHER_FAMILIES = ("open_clip", "transformers")
# model class -> whether its encode_text takes input shorter than the context (see encode_text)
_SLICES_CONTEXT: dict[type, bool] = {}


def _missing(obj, names) -> list[str]:
    return [n for n in names if not hasattr(obj, n)]


def _tokenizer(context_length: int):
    import clip
    return lambda texts: clip.tokenize(texts, context_length=context_length, truncate=True)


class OpenAIClipBackend(ConvViTBackend):
    """OpenAI clip (clip-anytorch) CLIP with a ViT tower."""

    family = "openai"

    @classmethod
    def claims(cls, model) -> bool:
        module = type(model).__module__
        if module == "clip.model":
            return hasattr(model, "visual")  # ResNet CLIPs too: check() says why they cannot be wrapped
        if module.split(".")[0] in OTHER_FAMILIES:
            return False
        if not all(callable(getattr(model, a, None)) for a in ("encode_image", "encode_text")):
            return False
        tower = getattr(model, "visual", None)
        if tower is None:
            return False
        # a vendored ResNet CLIP is still this family, refused with the reason by check()
        return not _missing(tower, VIT_ATTRIBUTES) or type(tower).__name__ == "ModifiedResNet"

    def check(self) -> None:
        tower = self.tower
        if type(tower).__name__ == "ModifiedResNet" or not self._is_vit(tower):
            raise UnsupportedModelError(
                f"{describe(self.model)} has a {type(tower).__name__} image tower (a ResNet CLIP such as "
                "RN50); E2 needs a ViT tower with a class token.")
        missing = _missing(tower, VIT_ATTRIBUTES)
        blocks = getattr(tower.transformer, "resblocks", None)
        if missing or blocks is None or len(blocks) == 0:
            raise UnsupportedModelError(
                f"{describe(self.model)}'s image tower lacks {missing or ['transformer.resblocks']}; an OpenAI "
                f"CLIP ViT (or a vendored copy) has {', '.join(VIT_ATTRIBUTES)} and transformer.resblocks.")
        for i, block in enumerate(blocks):
            lacks = _missing(block, BLOCK_ATTRIBUTES)
            if lacks or not isinstance(block.attn, nn.MultiheadAttention):
                raise UnsupportedModelError(
                    f"{describe(self.model)}: image block {i} ({type(block).__name__}) is not an OpenAI CLIP "
                    f"residual attention block (needs {', '.join(BLOCK_ATTRIBUTES)} with attn an "
                    f"nn.MultiheadAttention; lacks {lacks or ['an nn.MultiheadAttention attn']}).")

    # --- building and loading ----------------------------------------------------------------------
    @classmethod
    def build_tiny(cls, cfg):
        from clip.model import CLIP
        cls.tiny_tower(cfg)  # OpenAI's CLIP has no SigLIP
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
        # clip-anytorch slices its causal mask and positional table to the input's length, so the padding
        # after the last end token can be left out; OpenAI's own package (and copies of it) add the full
        # table and fail on shorter input. Which kind a class is, is learnt on its first call.
        model = self.model
        trimmed = trim_after_end(tokens, tokens.argmax(-1))
        if trimmed.shape[1] == tokens.shape[1] or not _SLICES_CONTEXT.get(type(model), True):
            return model.encode_text(tokens)
        if type(model) in _SLICES_CONTEXT:
            return model.encode_text(trimmed)
        try:
            out = model.encode_text(trimmed)
        except RuntimeError:
            out = model.encode_text(tokens)  # raises again if the failure was not the length
            _SLICES_CONTEXT[type(model)] = False
            return out
        _SLICES_CONTEXT[type(model)] = True
        return out

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
