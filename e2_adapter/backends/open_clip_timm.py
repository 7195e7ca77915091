"""open_clip models whose image tower is a ``TimmModel`` around a timm ``VisionTransformer``.

That is every open_clip SigLIP (``ViT-B-16-SigLIP`` and kin, Marqo-FashionSigLIP: no class token,
positions on the patches only, a MAP head, no projection) and the other timm-ViT configs (a class
token or none, register tokens, ``no_embed_class``, ``global_pool`` token, avg or map, a linear or MLP
projection in ``TimmModel.head``). The steps are timm's own: ``patch_embed``, ``_pos_embed``,
``patch_drop``, ``norm_pre``, ``blocks``, ``norm``, ``pool`` / ``fc_norm``, then the projection
(``trunk.head`` and ``TimmModel.head``). Convolutional trunks (ConvNeXt, ResNet, ...) are refused.

timm ``Eva`` trunks (open_clip's EVA01 / EVA02 configs) are ViTs with the same steps; EVA02 adds
rotary positions, applied inside attention to every token after the attention's own prefix. E2's
selection tokens sit between the prefix and the patches, so the rotation table is padded with identity
rows (sin 0, cos 1) for them: the patches keep their own rotations and the tokens get none, as the class
token does. Once the patches are dropped no rotation is left to apply.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import UnsupportedModelError, VisionBackend, describe
from .open_clip import OpenClipBackend


def _is_timm_tower(tower: nn.Module) -> bool:
    try:
        from open_clip.timm_model import TimmModel
    except ImportError:  # pragma: no cover - open_clip without its timm adapter
        return False
    return isinstance(tower, TimmModel)


class OpenClipTimmBackend(VisionBackend):
    """open_clip CLIP / CustomTextCLIP with a timm VisionTransformer trunk (SigLIP's included)."""

    family = "open_clip_timm"
    lora_targets = ("c_fc", "c_proj", "fc1", "fc2")  # open_clip text blocks' mlp, timm vision blocks' Mlp
    zoo_family = "open_clip"  # built by open_clip.create_model, like the plain open_clip ViTs

    @classmethod
    def claims(cls, model) -> bool:
        return type(model).__module__.startswith("open_clip") and _is_timm_tower(getattr(model, "visual", None))

    def check(self) -> None:
        name, trunk = describe(self.model), self.tower.trunk
        if not isinstance(trunk, _vit_trunk_classes()):
            kind = type(trunk).__name__
            conv = any(k in kind.lower() for k in ("convnext", "resnet", "efficientnet", "regnet", "convnet", "fastvit"))
            reason = ("a convolutional trunk has no patch tokens for E2's selection tokens to sit among"
                      if conv else "only timm VisionTransformer and Eva trunks are supported (this one's "
                      "blocks, positions or token layout differ)")
            raise UnsupportedModelError(f"{name} has a timm {kind} image tower (open_clip TimmModel); E2 needs a "
                                        f"timm VisionTransformer or Eva trunk: {reason}.")
        if getattr(trunk, "rope_mixed", False):
            raise UnsupportedModelError(
                f"{name}'s timm Eva trunk uses depth-dependent ('mixed') rotary positions, which E2's backend "
                "does not lay out; EVA01 / EVA02 (one rotation table for every block) are supported.")
        if trunk.attn_pool is None and trunk.global_pool not in ("token", "avg", "max", "avgmax"):
            raise UnsupportedModelError(
                f"{name}'s timm trunk has global_pool={trunk.global_pool!r}: it returns every token, not a "
                "pooled embedding, so there is no global embedding for E2 to keep.")

    @staticmethod
    def find_tower(model):
        return model.visual

    @property
    def trunk(self):
        return self.tower.trunk

    @property
    def width(self) -> int:
        return self.trunk.embed_dim

    @property
    def num_blocks(self) -> int:
        return len(self.trunk.blocks)

    @property
    def embed_dim(self) -> int:
        head, trunk_head = self.tower.head, self.trunk.head
        if hasattr(head, "proj"):
            return head.proj.out_features
        if hasattr(head, "mlp"):
            return head.mlp.fc2.out_features
        return trunk_head.out_features if isinstance(trunk_head, nn.Linear) else self.trunk.num_features

    @property
    def num_prefix_tokens(self) -> int:
        return self.trunk.num_prefix_tokens  # class token (if any) + registers

    @property
    def pools_patches(self) -> bool:
        return self.trunk.attn_pool is not None or self.trunk.global_pool != "token"

    def compute_weight(self):
        # the patch projection, or the first weight of a hybrid stem (ViTamin: conv stages, proj Identity)
        embed = self.trunk.patch_embed
        weight = getattr(getattr(embed, "proj", None), "weight", None)
        return weight if weight is not None else next(embed.parameters())

    def embed(self, images, **kwargs):
        t = self.trunk
        x = t._pos_embed(t.patch_embed(images.to(self.compute_weight().dtype)))  # prefix tokens, positions
        if isinstance(x, tuple):  # Eva: (tokens, rotary table), patch dropout already applied to both
            x, self._rope = x
            return x
        return t.patch_drop(x)  # keeps the prefix tokens, drops patches while training

    def pre_norm(self, x):
        return self.trunk.norm_pre(x)

    def run_blocks(self, x, start, end, attn_mask):
        trunk = self.trunk
        kwargs = {} if attn_mask is None else {"attn_mask": attn_mask}
        if getattr(self, "_rope", None) is not None:
            kwargs["rope"] = self._rope_for(x.shape[1])
        for block in list(trunk.blocks)[start:end]:
            if getattr(trunk, "grad_checkpointing", False) and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False, **kwargs)
            else:
                x = block(x, **kwargs)
        return x

    def _rope_for(self, length: int) -> torch.Tensor | None:
        """Eva's rotary table ([N, 2d] sin|cos, or [B, 1, N, 2d] after patch dropout) for a sequence of
        ``length``: identity rows for the E2 tokens in front of the patches, None when they were dropped."""
        rope, patches = self._rope, self._rope.shape[-2]
        inserted = self.tower.e2.tokens.shape[0]
        if length == self.num_prefix_tokens + inserted:
            return None  # [prefix, tokens] only: the patches are gone, nothing to rotate
        if length != self.num_prefix_tokens + inserted + patches:
            raise RuntimeError(f"{length} tokens do not match the Eva layout [prefix {self.num_prefix_tokens}, "
                               f"E2 tokens {inserted}, patches {patches}]")
        half = rope.shape[-1] // 2
        identity = torch.cat([rope.new_zeros(*rope.shape[:-2], inserted, half),
                              rope.new_ones(*rope.shape[:-2], inserted, half)], dim=-1)
        return torch.cat([identity, rope], dim=-2)

    @property
    def final_norm(self):
        # the norm the region heads copy: timm's final norm, or fc_norm where it pools first (avg)
        norm = self.trunk.norm
        return self.trunk.fc_norm if isinstance(norm, nn.Identity) else norm

    def pool(self, x):
        t = self.trunk
        return t.head_drop(t.fc_norm(t.pool(t.norm(x))))  # timm's forward_head before its classifier

    def projection_weight(self):
        # A single linear map with no bias-free alternative: trunk.head (timm_proj None) or head.proj.
        trunk_head, head = self.trunk.head, self.tower.head
        if isinstance(trunk_head, nn.Linear) and len(head) == 0:
            return trunk_head.weight.t()
        if isinstance(trunk_head, nn.Identity) and hasattr(head, "proj"):
            return head.proj.weight.t()
        return None  # SigLIP (no projection: the heads start as the identity) or an MLP projection

    def project(self, pooled):
        return self.tower.head(self.trunk.head(pooled))

    def class_token(self):
        t = self.trunk
        if t.cls_token is None:
            raise UnsupportedModelError(
                f"{describe(self.model)}'s timm tower has no class token to start the selection tokens from; "
                "use token_init='normal' (the default)")
        cls = t.cls_token[0, 0]
        return cls if t.no_embed_class or t.pos_embed is None else cls + t.pos_embed[0, 0]

    def tower_output(self, out, **kwargs):
        return out.image

    def encode_image(self, images):
        return self.model.encode_image(images)

    # The text towers are open_clip's own (CLIP's causal one, SigLIP's last-token one): the same call.
    encode_text = OpenClipBackend.encode_text


def _vit_trunk_classes() -> tuple[type, ...]:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer, Eva


def tiny_model(pool: str = "map", class_token: bool = False, no_embed_class: bool = True, reg_tokens: int = 0,
               proj: str = "none", embed_dim: int = 64, width: int = 64, depth: int = 2, image_size: int = 32,
               patch_size: int = 8, sigmoid: bool = True, context_length: int = 16, seed: int | None = 0,
               hybrid_stem: bool = False, eva02: bool = False):
    """A random open_clip ``CustomTextCLIP`` with a ``TimmModel`` tower shaped like ViT-B-16-SigLIP's
    (timm's ``vit_base_patch16_siglip_224`` entry point at a small width; defaults: no class token,
    positions on the patches only, a MAP head, no projection, a logit bias) or, with the arguments,
    another timm ViT layout. ``hybrid_stem``: ViTamin's patch embedding, convolutions feeding timm's
    ``HybridEmbed`` with no projection of its own. ``eva02``: timm's
    ``eva02_base_patch16_clip_224`` trunk (EVA02-B-16's: rotary positions, SwiGLU) instead. For tests:
    nothing is downloaded."""
    import timm
    from open_clip.model import CustomTextCLIP
    from open_clip.timm_model import TimmModel

    if seed is not None:
        torch.manual_seed(seed)
    text_cfg = dict(context_length=context_length, vocab_size=49408, width=width, heads=2, layers=1,
                    no_causal_mask=sigmoid, pool_type="last" if sigmoid else "argmax", proj_bias=sigmoid)
    vision_cfg = dict(image_size=image_size, patch_size=patch_size, width=width, layers=1, head_width=width // 2)
    model = CustomTextCLIP(embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg,
                           init_logit_scale=float(torch.log(torch.tensor(10.0))) if sigmoid else 2.659,
                           init_logit_bias=-10.0 if sigmoid else None)
    # TimmModel builds its trunk from a registered name at 224 px; build the same class small instead.
    tower = TimmModel.__new__(TimmModel)
    nn.Module.__init__(tower)
    tower.image_size = (image_size, image_size)
    trunk_name, registers = ("eva02_base_patch16_clip_224", "num_reg_tokens") if eva02 else \
        ("vit_base_patch16_siglip_224", "reg_tokens")
    tower.trunk = timm.create_model(
        trunk_name, pretrained=False, img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth,
        num_heads=2, class_token=class_token, no_embed_class=no_embed_class, global_pool=pool,
        num_classes=0 if proj in ("none", "linear") else embed_dim, **{registers: reg_tokens})
    if hybrid_stem:
        from timm.layers.hybrid_embed import HybridEmbed
        stem = nn.Sequential(nn.Conv2d(3, width // 2, 3, stride=2, padding=1), nn.GELU(),
                             nn.Conv2d(width // 2, width, 3, stride=patch_size // 2, padding=1))
        tower.trunk.patch_embed = HybridEmbed(stem, img_size=image_size, embed_dim=width, proj=False)
    head = nn.Sequential()
    if proj == "linear":
        head.add_module("proj", nn.Linear(width, embed_dim, bias=False))
    tower.head = head
    model.visual = tower
    return model.eval()
