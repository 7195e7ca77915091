"""The E2 forward of a vision tower, through a backend (so it knows no CLIP family).

    embed -> [CLS, selection tokens, patches] -> pre-norm
    -> blocks up to each fusion point -> fusion (tokens pick and fuse one patch each)
    -> after the last fusion the patches are dropped -> remaining blocks on [CLS, tokens]
    -> global = project(final_norm(CLS)); regions = heads(tokens)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends.base import VisionBackend
from .modules import E2Adapter


@dataclass
class E2Output:
    image: torch.Tensor                 # [B, D] global embedding (what encode_image returns)
    regions: dict[str, torch.Tensor]    # entity -> [B, D]
    selections: torch.Tensor            # [B, F, S] patch index chosen by each token in each fusion block
    pooled: torch.Tensor                # [B, W] normalised CLS before the projection
    tokens: torch.Tensor                # [B, L, W] tokens after the last block


def gated_mask(num_tokens: int, length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive mask for the gated preset: CLS and patches may not attend to the selection tokens
    (positions 1..S), so their stream is exactly the original CLIP's; the tokens see everything."""
    mask = torch.zeros(length, length, dtype=dtype, device=device)
    blocked = torch.ones(length, dtype=torch.bool, device=device)
    blocked[1:1 + num_tokens] = False
    mask[blocked.nonzero(), 1:1 + num_tokens] = torch.finfo(dtype).min
    return mask


def e2_forward(backend: VisionBackend, adapter: E2Adapter, images: torch.Tensor, **embed_kwargs) -> E2Output:
    x = backend.embed(images, **embed_kwargs)
    batch = x.shape[0]
    num_tokens = adapter.tokens.shape[0]
    tokens = adapter.tokens.to(x.dtype).expand(batch, -1, -1)
    x = backend.pre_norm(torch.cat([x[:, :1], tokens, x[:, 1:]], dim=1))

    gated = adapter.gate is not None
    drop_patches = adapter.config.drop_patches  # never with gated (E2Config): CLS keeps seeing the patches
    mask = gated_mask(num_tokens, x.shape[1], x.dtype, x.device) if gated else None

    selections, start = [], 0
    last = len(adapter.fusion_after) - 1
    for i, (end, fusion) in enumerate(zip(adapter.fusion_after, adapter.fusions)):
        x = backend.run_blocks(x, start, end, mask)
        cls, tokens, patches = x[:, :1], x[:, 1:1 + num_tokens], x[:, 1 + num_tokens:]
        tokens, chosen = fusion(tokens, patches, adapter.tau)
        selections.append(chosen)
        if i == last and drop_patches:
            x = torch.cat([cls, tokens], dim=1)
        else:
            x = torch.cat([cls, tokens, patches], dim=1)
        start = end
    x = backend.run_blocks(x, start, backend.num_blocks, mask)

    cls, tokens = x[:, 0], x[:, 1:1 + num_tokens]
    if gated:  # zero at step 0: the tokens reach the global embedding only as the gate opens
        cls = cls + adapter.gate.to(cls.dtype) * tokens.mean(1)
    pooled = backend.final_norm(cls)
    selections = torch.stack(selections, dim=1) if selections else \
        torch.empty(batch, 0, num_tokens, dtype=torch.long, device=x.device)
    return E2Output(image=backend.project(pooled), regions=adapter.heads(tokens),
                    selections=selections, pooled=pooled, tokens=x)


class E2VisionForward:
    """Installed as the vision tower's ``forward``. A small picklable object rather than a closure,
    so a wrapped model survives ``copy.deepcopy``, ``pickle`` and ``torch.compile``."""

    def __init__(self, backend: VisionBackend):
        self.backend = backend

    def __call__(self, images: torch.Tensor | None = None, *args, **kwargs):
        if images is None:  # transformers calls vision_model(pixel_values=...)
            images = kwargs.pop("pixel_values")
        embed_kwargs = {k: kwargs[k] for k in ("interpolate_pos_encoding",) if k in kwargs}
        out = e2_forward(self.backend, self.backend.tower.e2, images, **embed_kwargs)
        return self.backend.tower_output(out)
