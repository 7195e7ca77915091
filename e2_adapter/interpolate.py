"""Weight-space interpolation between a pre-trained CLIP and its fine-tuned version (WiSE-FT).

Fine-tuning on one caption style forgets the others (the composed-retrieval controls in the README
measure it). WiSE-FT (Wortsman et al., CVPR 2022) mixes the two weight sets instead of choosing one:
``theta = (1 - alpha) * theta_base + alpha * theta_finetuned``. Tensors the base does not have (E2's
selection tokens and fusion blocks, LoRA matrices) have nothing to mix with and stay as fine-tuned.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def interpolate_weights(model: nn.Module, base_state: Mapping[str, torch.Tensor], alpha: float) -> int:
    """Move ``model``'s weights, in place, to ``(1 - alpha) * base + alpha * model`` for every tensor
    ``base_state`` has (alpha 0: the base where the base has weights; 1: unchanged). Returns how many
    tensors were mixed. Integer buffers (e.g. position ids) are copied from the model, not mixed.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (0: the base, 1: the fine-tuned model), got {alpha}")
    state = model.state_dict()
    unknown = sorted(set(base_state) - set(state))
    if unknown:
        raise ValueError(f"the base has {len(unknown)} tensors the model lacks (e.g. {unknown[:3]}): "
                         "pass the state dict of the model this one was fine-tuned from")
    mismatched = [k for k in base_state if base_state[k].shape != state[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(f"{len(mismatched)} tensors differ in shape from the base, e.g. {k}: "
                         f"{tuple(state[k].shape)} vs {tuple(base_state[k].shape)}")
    mixed = 0
    with torch.no_grad():
        for name, base in base_state.items():
            target = state[name]
            if not target.is_floating_point():
                continue
            target.lerp_(base.to(device=target.device, dtype=target.dtype), 1.0 - alpha)
            mixed += 1
    return mixed
