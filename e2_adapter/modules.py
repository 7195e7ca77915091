"""E2's new parameters as plain torch modules. Nothing here knows which CLIP family it sits in.

Token layout inside the tower (CLS first, so every family's "token 0 is CLS" convention holds):
    [CLS, selection tokens (entity-major: e0t0, e0t1, e1t0, ...), patches]
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from .config import E2Config


def is_plain_linear(layer: nn.Module) -> bool:
    """True when calling ``layer`` is exactly ``F.linear(x, layer.weight, layer.bias)``, so its weight
    may be used directly: an ``nn.Linear`` itself (not a subclass such as a parametrized, quantised or
    peft LoRA layer) with no forward hooks on it and no global module hooks."""
    from torch.nn.modules import module as torch_module
    return (type(layer) is nn.Linear and not layer._forward_hooks and not layer._forward_pre_hooks
            and not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks)


def linear_as(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """``layer(x)`` computed in x's dtype: a half-precision CLIP feeds fp16 activations to E2's layers
    whatever dtype their weights were kept in (the cast is differentiable, so fp32 weights still train).
    A layer that is not a plain ``nn.Linear`` (LoRA, hooks, quantisation) is called, never bypassed."""
    if not is_plain_linear(layer):
        weight = getattr(layer, "weight", None)
        inputs = x.to(weight.dtype) if torch.is_tensor(weight) and weight.is_floating_point() else x
        return layer(inputs).to(x.dtype)
    bias = layer.bias.to(x.dtype) if layer.bias is not None else None
    return F.linear(x, layer.weight.to(x.dtype), bias)


def layer_norm_fp32(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm computed in fp32 and returned in x's dtype, as CLIP's own mixed-precision norms do."""
    weight = norm.weight.float() if norm.weight is not None else None
    bias = norm.bias.float() if norm.bias is not None else None
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps).to(x.dtype)


def hard_select(scores: torch.Tensor, tau: float, training: bool) -> torch.Tensor:
    """One-hot choice over the last dim.

    Training: straight-through Gumbel-softmax (hard forward, soft gradient). Evaluation: a plain
    argmax, so inference is deterministic (the reference code samples noise at test time too).
    """
    if training:
        return F.gumbel_softmax(scores.float(), tau=tau, hard=True).to(scores.dtype)
    return F.one_hot(scores.argmax(-1), scores.shape[-1]).to(scores.dtype)


class FusionBlock(nn.Module):
    """Hard attention: each selection token picks one patch and fuses with it.

    fused = (value(chosen patch) + token) / 2. Patches pass through unchanged.
    ``value`` starts as the identity, so at step 0 a token is the mean of itself and its patch.
    """

    def __init__(self, width: int, qk_rank: int | None = None):
        super().__init__()
        qk = qk_rank or width
        self.query = nn.Linear(width, qk, bias=False)
        self.key = nn.Linear(width, qk, bias=False)
        self.value = nn.Linear(width, width, bias=False)
        self.scale = qk ** -0.5
        nn.init.normal_(self.query.weight, std=width ** -0.5)
        nn.init.normal_(self.key.weight, std=width ** -0.5)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(width))

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor, tau: float = 1.0,
                patch_mask: torch.Tensor | None = None):
        """tokens [B,S,W], patches [B,N,W] -> (fused tokens [B,S,W], chosen patch index [B,S]).
        ``patch_mask`` [B,N] bool: False marks padding (variable-length inputs), never picked."""
        q = linear_as(tokens, self.query)
        if is_plain_linear(self.key):
            # q.k^T folded as (q W_k) p^T: S queries meet the key weights instead of N patches (same scores).
            scores = (q @ self.key.weight.to(tokens.dtype)) @ patches.transpose(1, 2) * self.scale
        else:  # a LoRA, hook or quantised key: run it, or it would be silently ignored
            scores = q @ linear_as(patches, self.key).transpose(1, 2) * self.scale
        if patch_mask is not None:
            scores = scores.masked_fill(~patch_mask[:, None, :], torch.finfo(scores.dtype).min)
        choice = hard_select(scores, tau, self.training)
        # value() is linear, so selecting before projecting equals projecting every patch, at S/N the cost.
        chosen = linear_as(choice.to(patches.dtype) @ patches, self.value)
        return (chosen + tokens) / 2, choice.argmax(-1)


class RegionHeads(nn.Module):
    """Per entity: its own LayerNorm, average pooling over its tokens, its own projection."""

    def __init__(self, entities: tuple[str, ...], tokens_per_entity: int, width: int, embed_dim: int):
        super().__init__()
        self.entities = tuple(entities)
        self.tokens_per_entity = tokens_per_entity
        self.norms = nn.ModuleDict({e: nn.LayerNorm(width) for e in entities})
        self.projs = nn.ModuleDict({e: nn.Linear(width, embed_dim, bias=False) for e in entities})

    def init_from(self, norm: nn.Module | None, proj_weight: torch.Tensor | None) -> None:
        """Start every head as a copy of the model's own final norm and projection (``proj_weight``
        is [W, D] as in CLIP's ``visual.proj``), so region embeddings start in the joint space."""
        with torch.no_grad():
            for e in self.entities:
                if norm is not None and getattr(norm, "weight", None) is not None and \
                        norm.weight.shape == self.norms[e].weight.shape:  # an attention pool's norm may be wider
                    self.norms[e].weight.copy_(norm.weight)
                    self.norms[e].bias.copy_(norm.bias)
                if proj_weight is not None and proj_weight.t().shape == self.projs[e].weight.shape:
                    self.projs[e].weight.copy_(proj_weight.t())
                elif self.projs[e].in_features == self.projs[e].out_features:
                    # no projection (SigLIP: the pooled vector is the embedding): start as the identity
                    self.projs[e].weight.copy_(torch.eye(self.projs[e].in_features))

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """tokens [B, S, W] entity-major -> {entity: [B, D]}."""
        grouped = tokens.unflatten(1, (len(self.entities), self.tokens_per_entity))
        return {e: linear_as(layer_norm_fp32(grouped[:, i], self.norms[e]).mean(1), self.projs[e])
                for i, e in enumerate(self.entities)}


class E2Adapter(nn.Module):
    """All of E2's parameters for one tower: selection tokens, fusion blocks, region heads (and, for
    the gated preset, the zero-initialised gate through which the tokens reach the global embedding)."""

    def __init__(self, config: E2Config, width: int, embed_dim: int, num_blocks: int):
        super().__init__()
        self.config = config
        self.fusion_after = config.resolve_fusion_after(num_blocks)
        self.tau = config.gumbel_tau  # plain attribute: trainers anneal it
        self.tokens = nn.Parameter(torch.randn(config.num_tokens, width) * width ** -0.5)
        self.fusions = nn.ModuleList(FusionBlock(width, config.qk_rank) for _ in self.fusion_after)
        self.heads = RegionHeads(config.entities, config.tokens_per_entity, width, embed_dim)
        self.gate = nn.Parameter(torch.zeros(width)) if config.gated else None

    def init_tokens_from(self, cls_token: torch.Tensor, noise_std: float = 0.02) -> None:
        """token_init='cls': every token starts at the class token (with its position), told apart by noise."""
        with torch.no_grad():
            self.tokens.copy_(cls_token.to(self.tokens) + noise_std * torch.randn_like(self.tokens))

    def parameter_groups(self) -> dict[str, int]:
        """Parameter counts by part, for reports."""
        count = lambda ps: sum(p.numel() for p in ps)
        groups = {"tokens": self.tokens.numel(), "fusion": count(self.fusions.parameters()),
                  "heads": count(self.heads.parameters())}
        if self.gate is not None:
            groups["gate"] = self.gate.numel()
        return groups

    def extra_repr(self) -> str:
        c = self.config
        return (f"entities={c.entities}, tokens_per_entity={c.tokens_per_entity}, fusion_after={self.fusion_after}, "
                f"qk_rank={c.qk_rank}, gated={c.gated}")
