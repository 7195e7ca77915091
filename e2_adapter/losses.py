"""E2's objective: a global CLIP loss plus one region loss per tag entity.

Region loss done right: a tag value that appears several times in a batch (two products of the same
brand) is one candidate, not several that are negatives of each other. Texts are deduplicated
and each distinct value's positives are all the images that carry it (multi-positive targets).

SigLIP models train with a pairwise sigmoid loss instead of InfoNCE (``loss="sigmoid"``, with the
model's logit bias): every (image, text) and (image, tag value) pair is its own binary problem, so a
tag value's several images are simply several positive pairs of the one value text.

Multi-process training (``*_share``): every process holds the whole gathered batch but scores only its
own rows against all columns. A share is that process's part of the one-process loss: the shares of
a partition of the rows sum to ``clip_loss`` / ``region_loss`` / ``e2_loss`` of the whole batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _logits(rows: torch.Tensor, columns: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale) * cos(rows, columns)`` [R, C], in fp32 also inside ``torch.autocast``: its fp16
    matmul would give fp16 logits, which the -1e9 masks below overflow (every E2 run under fp16 AMP on
    CUDA crashed there) and whose log-sum-exps lose precision."""
    with torch.autocast(rows.device.type, enabled=False):
        return logit_scale.exp().float() * _normalize(rows) @ _normalize(columns).t()


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; row i of ``image`` and ``text`` is a positive pair."""
    logits = _logits(image, text, logit_scale)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: each (image, text) pair is its own binary problem, positive on
    the diagonal; ``-sum log sigmoid(label * (scale * cos + bias))`` over all B x B pairs, divided by B."""
    return _sigmoid_pairs(image, text, torch.arange(image.shape[0], device=image.device),
                          logit_scale, logit_bias) / image.shape[0]


def _sigmoid_pairs(rows: torch.Tensor, columns: torch.Tensor, positive_column: torch.Tensor,
                   logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """Summed pairwise sigmoid loss of ``rows`` [R, D] against ``columns`` [C, D]; row r's one
    positive is column ``positive_column[r]``, every other pair is a negative."""
    logits = _logits(rows, columns, logit_scale) + logit_bias.float()
    labels = 2 * F.one_hot(positive_column.to(logits.device), columns.shape[0]).to(logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum()


def pair_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              logit_bias: torch.Tensor | None = None, loss: str = "softmax") -> torch.Tensor:
    """The global loss of the model's family: ``clip_loss`` ("softmax") or ``sigmoid_loss`` ("sigmoid")."""
    return clip_loss(image, text, logit_scale) if _check_family(loss, logit_bias) == "softmax" else \
        sigmoid_loss(image, text, logit_scale, logit_bias)


def _check_family(loss: str, logit_bias) -> str:
    if loss not in ("softmax", "sigmoid"):
        raise ValueError(f"loss must be 'softmax' (CLIP's InfoNCE) or 'sigmoid' (SigLIP's), got {loss!r}")
    if loss == "sigmoid" and logit_bias is None:
        raise ValueError("the sigmoid loss needs the model's logit_bias (a SigLIP model has one)")
    return loss


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
    logits = _logits(region, value_text, logit_scale)                          # [B, U]
    image_to_value = F.cross_entropy(logits, value_ids)
    scores = logits.t()                                                         # [U, B]
    positive = F.one_hot(value_ids, value_text.shape[0]).t().bool()           # [U, B]
    # -1e9 rather than -inf: a value every image carries has no negatives, and -inf would give NaN grads
    negatives = torch.logsumexp(scores.masked_fill(positive, -1e9), dim=1, keepdim=True)
    per_positive = torch.logaddexp(scores, negatives) - scores                 # -log p(positive | it + negatives)
    value_to_image = ((per_positive * positive).sum(1) / positive.sum(1)).mean()
    return (image_to_value + value_to_image) / 2


def sigmoid_region_loss(region: torch.Tensor, value_ids: torch.Tensor, value_text: torch.Tensor,
                        logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss between B image-region embeddings and U distinct tag-value
    embeddings: the pair (image, value) is positive when the image carries the value, negative
    otherwise, so every image of a brand is a positive of the brand's one text and no image is a
    negative of its own value. Summed over the B x U pairs, divided by B (as ``sigmoid_loss``)."""
    return _sigmoid_pairs(region, value_text, value_ids, logit_scale, logit_bias) / region.shape[0]


def e2_loss(image: torch.Tensor, text: torch.Tensor, regions: dict[str, torch.Tensor],
            tag_ids: dict[str, torch.Tensor], tag_text: dict[str, torch.Tensor], logit_scale: torch.Tensor,
            global_weight: float = 0.5, region_weight: float = 0.5, *, loss: str = "softmax",
            logit_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``global_weight * global + region_weight * mean over entities of the region losses``
    (the paper: 0.5 / 0.5). Returns the total and each part, for logging. ``loss``: the model's
    family, "softmax" (CLIP's InfoNCE) or "sigmoid" (SigLIP's pairwise loss, with ``logit_bias``),
    for the global and the region losses alike."""
    if _check_family(loss, logit_bias) == "sigmoid":
        parts = {"global": sigmoid_loss(image, text, logit_scale, logit_bias)}
        for entity, emb in regions.items():
            parts[f"region/{entity}"] = sigmoid_region_loss(emb, tag_ids[entity], tag_text[entity], logit_scale,
                                                            logit_bias)
        return {"loss": _weighted_total(parts, global_weight, region_weight), **parts}
    parts = {"global": clip_loss(image, text, logit_scale)}
    for entity, emb in regions.items():
        parts[f"region/{entity}"] = region_loss(emb, tag_ids[entity], tag_text[entity], logit_scale)
    return {"loss": _weighted_total(parts, global_weight, region_weight), **parts}


def _weighted_total(parts: dict[str, torch.Tensor], global_weight: float, region_weight: float) -> torch.Tensor:
    region_terms = [v for k, v in parts.items() if k.startswith("region/")]
    total = global_weight * parts["global"]
    if region_terms and region_weight:
        total = total + region_weight * torch.stack(region_terms).mean()
    return total


# --- shares of the one-process losses, for gathered multi-process batches -------------------------------

def clip_loss_share(image: torch.Tensor, text: torch.Tensor, rows: slice, logit_scale: torch.Tensor) -> torch.Tensor:
    """This process's part of ``clip_loss(image, text)``: its ``rows`` of the [B, D] gathered batch
    scored against all B columns (labels offset by the rows' start)."""
    labels = torch.arange(rows.start, rows.stop, device=image.device)
    image_to_text = F.cross_entropy(_logits(image[rows], text, logit_scale), labels, reduction="sum")
    text_to_image = F.cross_entropy(_logits(text[rows], image, logit_scale), labels, reduction="sum")
    return (image_to_text + text_to_image) / (2 * image.shape[0])


def region_loss_share(region: torch.Tensor, value_ids: torch.Tensor, value_text: torch.Tensor, rows: slice,
                      logit_scale: torch.Tensor) -> torch.Tensor:
    """This process's part of ``region_loss`` over the gathered batch: ``region`` [B, D] and
    ``value_ids`` [B] cover every process's rows, ``value_text`` [U, D] the batch's distinct values.
    image -> value for its own rows; value -> image for the positives among its own rows, each against
    the value's negatives in the whole batch and weighted by the value's positive count in the whole batch."""
    value_ids = value_ids.to(region.device)
    n_rows, n_values = region.shape[0], value_text.shape[0]
    image_to_value = F.cross_entropy(_logits(region[rows], value_text, logit_scale), value_ids[rows],
                                     reduction="sum") / n_rows
    scores = _logits(value_text, region, logit_scale)                          # [U, B]
    positive = F.one_hot(value_ids, n_values).t().bool()                       # [U, B]
    negatives = torch.logsumexp(scores.masked_fill(positive, -1e9), dim=1, keepdim=True)
    mine = scores[:, rows]
    per_positive = torch.logaddexp(mine, negatives) - mine
    value_to_image = ((per_positive * positive[:, rows]).sum(1) / positive.sum(1)).sum() / n_values
    return (image_to_value + value_to_image) / 2


def sigmoid_loss_share(image: torch.Tensor, text: torch.Tensor, rows: slice, logit_scale: torch.Tensor,
                       logit_bias: torch.Tensor) -> torch.Tensor:
    """This process's part of ``sigmoid_loss``: its image ``rows`` against all B texts (the loss is a
    sum over pairs, so the rows' pairs are a share)."""
    positive = torch.arange(rows.start, rows.stop, device=image.device)
    return _sigmoid_pairs(image[rows], text, positive, logit_scale, logit_bias) / image.shape[0]


def sigmoid_region_loss_share(region: torch.Tensor, value_ids: torch.Tensor, value_text: torch.Tensor,
                              rows: slice, logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """This process's part of ``sigmoid_region_loss``: its region ``rows`` against all U values."""
    return _sigmoid_pairs(region[rows], value_text, value_ids.to(region.device)[rows], logit_scale,
                          logit_bias) / region.shape[0]


def e2_loss_share(image: torch.Tensor, text: torch.Tensor, regions: dict[str, torch.Tensor],
                  tag_ids: dict[str, torch.Tensor], tag_text: dict[str, torch.Tensor], rows: slice,
                  logit_scale: torch.Tensor, global_weight: float = 0.5,
                  region_weight: float = 0.5, *, loss: str = "softmax",
                  logit_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``e2_loss`` split by rows: every part (and the total, a linear mix of them) is this process's share."""
    if _check_family(loss, logit_bias) == "sigmoid":
        parts = {"global": sigmoid_loss_share(image, text, rows, logit_scale, logit_bias)}
        for entity, emb in regions.items():
            parts[f"region/{entity}"] = sigmoid_region_loss_share(emb, tag_ids[entity], tag_text[entity], rows,
                                                                  logit_scale, logit_bias)
        return {"loss": _weighted_total(parts, global_weight, region_weight), **parts}
    parts = {"global": clip_loss_share(image, text, rows, logit_scale)}
    for entity, emb in regions.items():
        parts[f"region/{entity}"] = region_loss_share(emb, tag_ids[entity], tag_text[entity], rows, logit_scale)
    return {"loss": _weighted_total(parts, global_weight, region_weight), **parts}


def pair_loss_share(image: torch.Tensor, text: torch.Tensor, rows: slice, logit_scale: torch.Tensor,
                    logit_bias: torch.Tensor | None = None, loss: str = "softmax") -> torch.Tensor:
    """This process's part of ``pair_loss``."""
    return clip_loss_share(image, text, rows, logit_scale) if _check_family(loss, logit_bias) == "softmax" else \
        sigmoid_loss_share(image, text, rows, logit_scale, logit_bias)
