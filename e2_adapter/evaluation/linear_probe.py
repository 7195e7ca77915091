"""Linear probing of frozen embeddings (the paper's per-entity probe).

A multinomial logistic regression is fitted full-batch with L-BFGS on
L2-normalised features. The problem is convex and the weights start at zero,
so the result is deterministic: the same inputs always give the same accuracy.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .retrieval import _as_embeddings


def _check_split(x: Any, y: Sequence[Any], name: str) -> torch.Tensor:
    feats = _as_embeddings(x, f"{name}_x")
    if len(y) != feats.shape[0]:
        raise ValueError(f"{name}_y has {len(y)} labels but {name}_x has {feats.shape[0]} rows")
    return feats


def _fit_logreg(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, epochs: int, lr: float, weight_decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    # One .step() runs up to `epochs` full-batch iterations; the strong Wolfe
    # line search makes lr=1 safe and stops early once the loss has converged.
    opt = torch.optim.LBFGS(
        [weight, bias], lr=lr, max_iter=epochs, history_size=20,
        tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(
    train_x: Any,
    train_y: Sequence[str],
    test_x: Any,
    test_y: Sequence[str],
    epochs: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit a linear classifier on ``train_x`` and report test accuracy (percent).

    ``epochs`` is the maximum number of full-batch L-BFGS iterations.
    ``weight_decay`` is an L2 penalty on the weights (not the bias).
    Test items whose label never occurs in training cannot be predicted; they
    count as wrong and are reported in ``n_test_unseen``. ``seed`` fixes torch's
    RNG for the fit; with the zero start the fit draws no random numbers, so
    it is kept only so every evaluation entry point takes the same arguments.
    """
    xtr = _check_split(train_x, train_y, "train")
    xte = _check_split(test_x, test_y, "test").to(dtype=xtr.dtype, device=xtr.device)
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"feature widths differ: train D={xtr.shape[1]}, test D={xte.shape[1]}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")

    classes = sorted(set(train_y))  # sorted: class order independent of data order
    index = {c: i for i, c in enumerate(classes)}
    ytr = torch.tensor([index[c] for c in train_y], device=xtr.device)
    seen = np.array([c in index for c in test_y], dtype=bool)

    if len(classes) == 1:  # nothing to learn: every prediction is the one class
        pred = torch.zeros(xte.shape[0], dtype=torch.int64)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            weight, bias = _fit_logreg(xtr, ytr, len(classes), epochs, lr, weight_decay)
        pred = (xte @ weight.T + bias).argmax(dim=1).cpu()

    yte = torch.tensor([index.get(c, -1) for c in test_y])  # -1 never equals a prediction
    correct = int((pred == yte).sum())
    return {
        "accuracy": 100.0 * correct / len(test_y),
        "n_classes": len(classes),
        "n_train": len(train_y),
        "n_test": len(test_y),
        "n_test_unseen": int((~seen).sum()),
    }


def _is_missing(tag: Any) -> bool:
    return tag is None or (isinstance(tag, str) and not tag.strip())


def probe_entities(
    train_x: Any,
    train_tags: Mapping[str, Sequence[str]],
    test_x: Any,
    test_tags: Mapping[str, Sequence[str]],
    **probe_kwargs: Any,
) -> dict[str, float]:
    """Run ``linear_probe`` once per entity (brand, category, season, ...).

    ``train_tags[entity][i]`` is item i's tag. Items whose tag is missing
    (None or empty string) are left out of that entity's probe, since they
    carry no label to learn or predict. Returns ``{entity: accuracy}``.
    """
    if set(train_tags) != set(test_tags):
        raise ValueError(
            f"train and test entities differ: {sorted(train_tags)} vs {sorted(test_tags)}"
        )
    xtr = torch.as_tensor(train_x)
    xte = torch.as_tensor(test_x)
    results = {}
    for entity in train_tags:
        tr, te = list(train_tags[entity]), list(test_tags[entity])
        if len(tr) != len(xtr) or len(te) != len(xte):
            raise ValueError(
                f"entity {entity!r}: {len(tr)} train / {len(te)} test tags for "
                f"{len(xtr)} train / {len(xte)} test items"
            )
        keep_tr = [i for i, t in enumerate(tr) if not _is_missing(t)]
        keep_te = [i for i, t in enumerate(te) if not _is_missing(t)]
        if not keep_tr or not keep_te:
            raise ValueError(f"entity {entity!r} has no tagged train or test items")
        res = linear_probe(
            xtr[keep_tr], [tr[i] for i in keep_tr], xte[keep_te], [te[i] for i in keep_te],
            **probe_kwargs,
        )
        results[entity] = res["accuracy"]
    return results
