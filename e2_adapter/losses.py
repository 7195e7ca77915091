"""E2's objective: a global CLIP loss plus one region loss per tag entity.

Region loss done right: a tag value that appears several times in a batch (two products of the same
brand) is one candidate, not several that are negatives of each other. Texts are deduplicated
and each distinct value's positives are all the images that carry it (multi-positive targets).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; row i of ``image`` and ``text`` is a positive pair."""
    logits = logit_scale.exp().float() * _normalize(image) @ _normalize(text).t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def deduplicate(values: list[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct values in first-seen order and, per item, the index of its value."""
    index: dict[str, int] = {}
    ids = [index.setdefault(v, len(index)) for v in values]
    return list(index), torch.tensor(ids, dtype=torch.long)


def region_loss(region: torch.Tensor, value_ids: torch.Tensor, value_text: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between B image-region embeddings and U distinct tag-value embeddings.

    image -> value: one positive among the U distinct values.
    value -> image: each image carrying the value is a positive scored against the images that do
    not carry it (the other positives are left out of its denominator, as in SupCon), so a model
    that puts every image of a brand on the brand's text reaches zero loss.
    """
    value_ids = value_ids.to(region.device)
    logits = logit_scale.exp().float() * _normalize(region) @ _normalize(value_text).t()  # [B, U]
    image_to_value = F.cross_entropy(logits, value_ids)
    scores = logits.t()                                                         # [U, B]
    positive = F.one_hot(value_ids, value_text.shape[0]).t().bool()           # [U, B]
    # -1e9 rather than -inf: a value every image carries has no negatives, and -inf would give NaN grads
    negatives = torch.logsumexp(scores.masked_fill(positive, -1e9), dim=1, keepdim=True)
    per_positive = torch.logaddexp(scores, negatives) - scores                 # -log p(positive | it + negatives)
    value_to_image = ((per_positive * positive).sum(1) / positive.sum(1)).mean()
    return (image_to_value + value_to_image) / 2


def e2_loss(image: torch.Tensor, text: torch.Tensor, regions: dict[str, torch.Tensor],
            tag_ids: dict[str, torch.Tensor], tag_text: dict[str, torch.Tensor], logit_scale: torch.Tensor,
            global_weight: float = 0.5, region_weight: float = 0.5) -> dict[str, torch.Tensor]:
    """``global_weight * global + region_weight * mean over entities of the region losses``
    (the paper: 0.5 / 0.5). Returns the total and each part, for logging."""
    parts = {"global": clip_loss(image, text, logit_scale)}
    for entity, emb in regions.items():
        parts[f"region/{entity}"] = region_loss(emb, tag_ids[entity], tag_text[entity], logit_scale)
    region_terms = [v for k, v in parts.items() if k.startswith("region/")]
    total = global_weight * parts["global"]
    if region_terms and region_weight:
        total = total + region_weight * torch.stack(region_terms).mean()
    return {"loss": total, **parts}
