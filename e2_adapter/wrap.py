"""Lay E2 into a CLIP in place, take it out again, and the small utilities around that.

After ``wrap(model)`` the vision tower has a child ``e2`` (all new parameters, state-dict prefix
``<tower>.e2.``) and its class is a subclass of its own (``tower.E2Tower``) whose ``forward`` runs the
E2 tower; nothing else changes, so the original state-dict keys, peft target names, isinstance checks
and ``encode_image``/``encode_text`` stay as they were.
"""
from __future__ import annotations

import torch
from torch import nn

from .backends import BACKENDS, UnsupportedModelError, VisionBackend, backend_for, unwrap_peft
from .config import DEFAULT_PRESET, E2Config
from .modules import E2Adapter
from . import tower as e2_tower
from .tower import E2Output, E2Tower, e2_forward


class NotWrappedError(ValueError):
    pass


def _wrapped_tower(model: nn.Module) -> nn.Module | None:
    for module in unwrap_peft(model).modules():
        if isinstance(module, E2Tower):
            return module
    return None


def _require_wrapped(model: nn.Module) -> nn.Module:
    tower = _wrapped_tower(model)
    if tower is None:
        raise NotWrappedError(f"{type(model).__name__} is not wrapped with E2: call e2_adapter.wrap(model) first")
    return tower


def is_wrapped(model: nn.Module) -> bool:
    return _wrapped_tower(model) is not None


def get_backend(model: nn.Module) -> VisionBackend:
    """The family backend of a (wrapped) model (for trainers: encode_text, logit_scale, ...).
    Given a wrapped tower alone, a backend rooted at that tower."""
    tower = _wrapped_tower(model)
    if tower is unwrap_peft(model):
        return BACKENDS[tower.e2.config.family].at_tower(tower)
    return backend_for(model)


def clip_towers(model: nn.Module):
    """What encodes ``model``'s images and texts (``.encode_image`` / ``.encode_text``): its family
    backend, or, for a model of no family e2-adapter knows that has both methods itself (a ResNet
    CLIP, a custom or test encoder), the model. Integrations call this instead of ``model.encode_*``,
    which a transformers CLIPModel does not have."""
    try:
        return get_backend(model)
    except UnsupportedModelError:
        if callable(getattr(model, "encode_image", None)) and callable(getattr(model, "encode_text", None)):
            return model
        raise


def get_adapter(model: nn.Module) -> E2Adapter:
    return _require_wrapped(model).e2


def wrap(model: nn.Module, config: E2Config | None = None, *, entities=None, preset: str | None = None,
         **overrides) -> nn.Module:
    """Patch ``model``'s vision tower with E2's selection tokens and fusion blocks, in place.

    ``wrap(model)``, ``wrap(model, entities=("brand",))``, ``wrap(model, preset="lean")`` or
    ``wrap(model, config=E2Config(...))``. Returns the same model object. A model built on the
    ``meta`` device is wrapped there (E2's parameters on ``meta`` too, nothing copied): load the
    weights afterwards with ``load_state_dict(state, assign=True)``, E2's included.
    """
    if is_wrapped(model):
        raise ValueError(f"{type(model).__name__} is already wrapped with E2; call e2_adapter.unwrap(model) "
                         "first to re-wrap it with another config")
    if config is None:
        if entities is not None:
            overrides["entities"] = entities
        config = E2Config.from_preset(preset or DEFAULT_PRESET, **overrides)
    elif entities is not None or preset is not None or overrides:
        raise ValueError("pass either config=E2Config(...) or keyword options (entities=, preset=, ...), not both")

    backend = backend_for(model)  # raises a clear error for unsupported models, model untouched
    config = config.for_tower(backend.pools_patches)
    if backend.pools_patches and config.drop_patches:
        from .backends.base import describe
        raise ValueError(
            f"{describe(unwrap_peft(model))} pools its global embedding over the patch tokens (average or "
            f"attention pooling), so E2 cannot drop the patches as preset {config.preset!r} does; use "
            "preset='gated' (what the default, 'auto', picks for such a tower), which keeps them and lets the "
            "tokens in through its gate")
    config = config.with_model_info(family=backend.family, width=backend.width, embed_dim=backend.embed_dim,
                                    num_blocks=backend.num_blocks)
    adapter = E2Adapter(config, backend.width, backend.embed_dim, backend.num_blocks)
    if backend.parameter_device().type != "meta":  # a meta model has no weights to start from yet
        if config.token_init == "cls":
            adapter.init_tokens_from(backend.class_token().detach().float())
        adapter.heads.init_from(backend.final_norm, _detached(backend.projection_weight()))
    adapter.to(device=backend.parameter_device(), dtype=backend.parameter_dtype())
    adapter.train(backend.tower.training)

    e2_tower.install(backend.tower, adapter)
    return model


def _detached(t):
    return None if t is None else t.detach().float()


def unwrap(model: nn.Module) -> nn.Module:
    """Remove E2 in place: the model computes exactly its original forward again. Returns it."""
    tower = _wrapped_tower(model)
    if tower is None:
        raise NotWrappedError(f"{type(model).__name__} is not wrapped with E2; nothing to unwrap")
    e2_tower.uninstall(tower)  # the class's own forward is back
    return model


def encode_image_regions(model: nn.Module, images: torch.Tensor, **kwargs) -> E2Output:
    """Global embedding, one embedding per entity, and the patches each token selected."""
    tower = _require_wrapped(model)
    backend = get_backend(model)
    return e2_forward(backend, tower.e2, images, project=backend.model is not None or backend.tower_projects,
                      **kwargs)


def mark_only_adapter_trainable(model: nn.Module) -> nn.Module:
    """Stage 1 of the recipe: freeze everything except E2's parameters."""
    adapter = get_adapter(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter.parameters():
        p.requires_grad_(True)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """trainable, total, and (when wrapped) E2's parts: tokens, fusion, heads, gate, adapter."""
    params = {id(p): p for p in model.parameters()}.values()  # shared parameters once
    counts = {"trainable": sum(p.numel() for p in params if p.requires_grad),
              "total": sum(p.numel() for p in params)}
    if is_wrapped(model):
        groups = get_adapter(model).parameter_groups()
        counts.update(groups)
        counts["adapter"] = sum(groups.values())
    return counts


def print_trainable_parameters(model: nn.Module) -> str:
    """peft's one-line report, plus E2's share when the model is wrapped."""
    c = count_parameters(model)
    line = (f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
            f"trainable%: {100 * c['trainable'] / max(c['total'], 1):.4f}")
    if "adapter" in c:
        base = c["total"] - c["adapter"]
        line += (f" || e2 params: {c['adapter']:,} ({100 * c['adapter'] / max(base, 1):.2f}% of the base model: "
                 f"tokens {c['tokens']:,}, fusion {c['fusion']:,}, heads {c['heads']:,}"
                 + (f", gate {c['gate']:,}" if "gate" in c else "") + ")")
    print(line)
    return line
