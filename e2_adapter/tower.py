"""The E2 forward of a vision tower, through a backend (so it knows no CLIP family).

    embed -> [prefix, selection tokens, patches] -> pre-norm
    -> blocks up to each fusion point -> fusion (tokens pick and fuse one patch each)
    -> after the last fusion the patches are dropped -> remaining blocks on [prefix, tokens]
    -> global = project(pool([prefix, patches])); regions = heads(tokens)

The prefix is the class token for CLIP towers (``pool`` is then the final norm of it), nothing for a
tower without one (SigLIP), class + register tokens for some timm towers. A tower that pools over its
patches (average, an attention probe) keeps them to the end: only the gated layout applies (wrap checks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .backends import BACKENDS
from .backends.base import VisionBackend
from .modules import E2Adapter


@dataclass
class E2Output:
    image: torch.Tensor | None          # [B, D] global embedding (what encode_image returns); None if not projected
    regions: dict[str, torch.Tensor]    # entity -> [B, D]
    selections: torch.Tensor            # [B, F, S] patch index chosen by each token in each fusion block
    pooled: torch.Tensor                # [B, W] the tower's pooled vector (normalised CLS) before the projection
    tokens: torch.Tensor                # [B, L, W] tokens after the last block


def gated_mask(num_tokens: int, length: int, dtype: torch.dtype, device, prefix: int = 1) -> torch.Tensor:
    """Additive mask for the gated preset: the prefix (CLS) and the patches may not attend to the
    selection tokens (positions prefix..prefix+S-1), so their stream is exactly the original model's;
    the tokens see everything."""
    mask = torch.zeros(length, length, dtype=dtype, device=device)
    selection = slice(prefix, prefix + num_tokens)
    blocked = torch.ones(length, dtype=torch.bool, device=device)
    blocked[selection] = False
    mask[blocked.nonzero(), selection] = torch.finfo(dtype).min
    return mask


def e2_forward(backend: VisionBackend, adapter: E2Adapter, images: torch.Tensor, project: bool = True,
               **embed_kwargs) -> E2Output:
    x = backend.embed(images, **embed_kwargs)
    batch = x.shape[0]
    num_tokens = adapter.tokens.shape[0]
    p = backend.num_prefix_tokens
    tokens = adapter.tokens.to(x.dtype).expand(batch, -1, -1)
    x = backend.pre_norm(torch.cat([x[:, :p], tokens, x[:, p:]], dim=1))

    gated = adapter.gate is not None
    drop_patches = adapter.config.drop_patches  # never with gated (E2Config): CLS keeps seeing the patches
    mask = gated_mask(num_tokens, x.shape[1], x.dtype, x.device, prefix=p) if gated else None

    selections, start = [], 0
    last = len(adapter.fusion_after) - 1
    for i, (end, fusion) in enumerate(zip(adapter.fusion_after, adapter.fusions)):
        x = backend.run_blocks(x, start, end, mask)
        prefix, tokens, patches = x[:, :p], x[:, p:p + num_tokens], x[:, p + num_tokens:]
        tokens, chosen = fusion(tokens, patches, adapter.tau, backend.patch_mask)
        selections.append(chosen)
        if i == last and drop_patches:
            x = torch.cat([prefix, tokens], dim=1)
        else:
            x = torch.cat([prefix, tokens, patches], dim=1)
        start = end
    x = backend.run_blocks(x, start, backend.num_blocks, mask)

    tokens = x[:, p:p + num_tokens]
    rest = torch.cat([x[:, :p], x[:, p + num_tokens:]], dim=1)  # what the original tower would pool
    if gated:  # zero at step 0: the tokens reach the global embedding only as the gate opens; added to
        # every token the pool reads (the class token alone for CLIP, the patches for a pooling tower)
        rest = rest + adapter.gate.to(rest.dtype) * tokens.mean(1, keepdim=True)
    pooled = backend.pool(rest)
    selections = torch.stack(selections, dim=1) if selections else \
        torch.empty(batch, 0, num_tokens, dtype=torch.long, device=x.device)
    return E2Output(image=backend.project(pooled) if project else None, regions=adapter.heads(tokens),
                    selections=selections, pooled=pooled, tokens=x)


class E2Tower:
    """Laid over a vision tower's own class by ``wrap`` (``tower.__class__`` becomes a subclass made
    once per tower class), so E2's forward is a method of the module it is called on: a DataParallel
    replica or a shallow copy runs its own weights, not the original's. ``unwrap`` restores the class.
    """
    _e2_base: ClassVar[type]  # the tower's own class

    def forward(self, images: torch.Tensor | None = None, *args, **kwargs):
        if images is None:  # transformers calls vision_model(pixel_values=...)
            images = kwargs.pop("pixel_values")
        backend = BACKENDS[self.e2.config.family].at_tower(self)
        embed_kwargs = {k: kwargs[k] for k in backend.embed_inputs if k in kwargs}
        out = e2_forward(backend, self.e2, images, project=backend.tower_projects, **embed_kwargs)
        return backend.tower_output(out)

    def __reduce_ex__(self, protocol):
        # The subclass is made at run time, so pickle and deepcopy rebuild it from the tower's own class.
        return _rebuild_e2_tower, (self._e2_base,), self.__getstate__()


_E2_TOWER_CLASSES: dict[type, type] = {}


def e2_tower_class(base: type) -> type:
    """The E2 subclass of a tower class (one per class, so isinstance checks keep holding)."""
    if base not in _E2_TOWER_CLASSES:
        _E2_TOWER_CLASSES[base] = type(f"E2{base.__name__}", (E2Tower, base),
                                       {"_e2_base": base, "__module__": __name__})
    return _E2_TOWER_CLASSES[base]


def _rebuild_e2_tower(base: type) -> nn.Module:
    cls = e2_tower_class(base)
    return cls.__new__(cls)


def install(tower: nn.Module, adapter: E2Adapter) -> None:
    tower.e2 = adapter
    tower.__class__ = e2_tower_class(type(tower))


def uninstall(tower: nn.Module) -> None:
    tower.__class__ = tower._e2_base
    del tower.e2
