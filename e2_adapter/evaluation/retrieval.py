"""Cross-modal retrieval protocols on precomputed embeddings.

Fashion papers report "R@K" under three different protocols that give very
different numbers, so each one is a separate, explicitly named function
(see docs/method.md, section 5):

- ``product_full``  (reference code): first image per product vs. one text per
  product, an N x N ranking over products.
- ``image_full``    (FashionViL-style): every image vs. every product text and
  back; a hit is any item of the query's product in the top k.
- ``sample_100``    (KaleidoBERT definition): each query is ranked against its
  positive plus 100 negatives from the same sub-category; averaged over repeats.

Every protocol returns percentages under the keys of ``METRIC_KEYS`` plus
``protocol``, ``n_queries`` (queries ranked over both directions, per repeat)
and the per-direction counts ``n_queries_t2i`` / ``n_queries_i2t``.

Tie-breaking (deterministic, order independent): a query's rank is the number
of *non-matching* gallery items whose similarity is >= the best matching
item's similarity. A negative that ties with the positive is therefore ranked
ahead of it. This is the pessimistic choice: a collapsed encoder (all
embeddings equal) scores 0, not 100, and the result never depends on the
order of the gallery. The optional faiss backend uses faiss's own ordering
among exact ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

PRODUCT_FULL = "product-full"
IMAGE_FULL = "image-full"
SAMPLE_100 = "sample-100"

DEFAULT_KS = (1, 5, 10)
METRIC_KEYS = ("t2i_R1", "t2i_R5", "t2i_R10", "i2t_R1", "i2t_R5", "i2t_R10", "SumR")

# ---------------------------------------------------------------------------
# Input checking
# ---------------------------------------------------------------------------


def _as_embeddings(x: Any, name: str) -> torch.Tensor:
    """Validate a [N, D] embedding matrix and return it L2-normalised.

    float64 stays float64 (useful for exact references); everything else is
    computed in float32 because half precision matmuls are slow or missing on CPU.
    """
    t = torch.as_tensor(x)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] matrix, got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if t.dtype != torch.float64:
        t = t.float()
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).any(dim=1).sum())
        raise ValueError(f"{name} contains NaN or Inf values in {bad} row(s)")
    return F.normalize(t, dim=1)


def _as_label_array(labels: Any, name: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        # Strings of different length still give a 1-D array; anything else is a caller bug.
        raise ValueError(f"{name} must be a 1-D sequence of labels, got shape {arr.shape}")
    return arr


def _encode_labels(query_labels: Any, gallery_labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Map arbitrary hashable labels (ints, strings, ...) to shared int64 ids."""
    q = _as_label_array(query_labels, "query_labels")
    g = _as_label_array(gallery_labels, "gallery_labels")
    if q.dtype.kind in "iub" and g.dtype.kind in "iub":
        return torch.from_numpy(q.astype(np.int64)), torch.from_numpy(g.astype(np.int64))
    vocab: dict[Any, int] = {}
    q_ids = [vocab.setdefault(v, len(vocab)) for v in q.tolist()]
    g_ids = [vocab.setdefault(v, len(vocab)) for v in g.tolist()]
    return torch.tensor(q_ids, dtype=torch.int64), torch.tensor(g_ids, dtype=torch.int64)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks}")
    return ks


def _check_pair(query: torch.Tensor, gallery: torch.Tensor, q_name: str, g_name: str) -> None:
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"embedding widths differ: {q_name} has D={query.shape[1]}, {g_name} has D={gallery.shape[1]}"
        )


def _check_len(labels: Any, n: int, name: str, emb_name: str) -> None:
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries but {emb_name} has {n} rows")


# ---------------------------------------------------------------------------
# The chunked ranker
# ---------------------------------------------------------------------------

# Bytes of one query chunk's similarity block: queries per chunk shrink as the gallery grows, so peak
# memory stays bounded (about 3x this plus the embeddings) whatever the catalogue size.
SIMILARITY_BLOCK_BYTES = 64 * 2**20
# Up to this many gallery items per label, a query's positives are looked up by index (product-full:
# 1, image-full: the product's views); beyond it a [chunk, G] label mask is cheaper to build.
_MAX_INDEXED_POSITIVES = 64


def _rows_per_chunk(chunk_size: int, gallery: torch.Tensor) -> int:
    per_query = gallery.shape[0] * gallery.element_size()
    return max(1, min(chunk_size, SIMILARITY_BLOCK_BYTES // per_query))


class _Positives:
    """Each query's matching gallery items as a padded index matrix, built once per (query, gallery)."""

    def __init__(self, q_ids: torch.Tensor, g_ids: torch.Tensor):
        order = torch.argsort(g_ids, stable=True)
        sorted_ids = g_ids[order]
        self.lo = torch.searchsorted(sorted_ids, q_ids)
        self.count = torch.searchsorted(sorted_ids, q_ids, right=True) - self.lo
        self.width = int(self.count.max().item()) if len(q_ids) else 0
        self.order = order

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([c, m] gallery indices, [c, m] valid) for queries start..stop."""
        offsets = torch.arange(max(self.width, 1), device=self.lo.device)
        valid = offsets[None, :] < self.count[start:stop, None]
        flat = (self.lo[start:stop, None] + offsets[None, :]).clamp_(max=len(self.order) - 1)
        return self.order[flat], valid


def _count(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row; an int32 sum runs about twice as fast as the default int64 one on CPU."""
    return mask.sum(dim=1, dtype=torch.int32).long()


def _ranks(q: torch.Tensor, g: torch.Tensor, q_ids: torch.Tensor, g_ids: torch.Tensor,
           chunk_size: int) -> torch.Tensor:
    """first_positive_rank on checked, normalised, same-device inputs."""
    chunk = _rows_per_chunk(chunk_size, g)
    indexed = _Positives(q_ids, g_ids)
    use_index = indexed.width <= _MAX_INDEXED_POSITIVES
    ranks = torch.empty(q.shape[0], dtype=torch.int64, device=q.device)
    for start in range(0, q.shape[0], chunk):
        stop = min(start + chunk, q.shape[0])
        sims = q[start:stop] @ g.T  # [c, G]
        if use_index:
            index, valid = indexed.rows(start, stop)
            pos_sims = sims.gather(1, index).masked_fill_(~valid, float("-inf"))
            best_pos = pos_sims.amax(dim=1, keepdim=True)
            # every item scoring >= the best positive, minus the positives among them (at least itself)
            rank = _count(sims >= best_pos) - _count((pos_sims >= best_pos) & valid)
            has_pos = valid.any(dim=1)
        else:
            is_pos = q_ids[start:stop, None] == g_ids[None, :]
            best_pos = sims.masked_fill(~is_pos, float("-inf")).amax(dim=1, keepdim=True)
            rank = _count((sims >= best_pos) & ~is_pos)
            has_pos = is_pos.any(dim=1)
        rank[~has_pos] = g.shape[0]
        ranks[start:stop] = rank
    return ranks


def _prepare(query_emb: Any, gallery_emb: Any, query_labels: Any, gallery_labels: Any):
    q = _as_embeddings(query_emb, "query_emb")
    g = _as_embeddings(gallery_emb, "gallery_emb")
    _check_pair(q, g, "query_emb", "gallery_emb")
    _check_len(query_labels, q.shape[0], "query_labels", "query_emb")
    _check_len(gallery_labels, g.shape[0], "gallery_labels", "gallery_emb")
    q_ids, g_ids = _encode_labels(query_labels, gallery_labels)
    return q, g.to(dtype=q.dtype, device=q.device), q_ids.to(q.device), g_ids.to(q.device)


def first_positive_rank(
    query_emb: Any,
    gallery_emb: Any,
    query_labels: Any,
    gallery_labels: Any,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """0-based rank of the best matching gallery item for every query.

    The rank is the number of non-matching gallery items with similarity >=
    the best matching one (ties go against the query, see module docstring).
    A query with no matching gallery item gets rank G (never a hit).
    Cosine similarity is computed at most ``chunk_size`` queries at a time, and
    fewer when a chunk's [c, G] block would exceed ``SIMILARITY_BLOCK_BYTES``,
    so peak memory is bounded whatever Q and G, never O(Q x G).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ranks(*_prepare(query_emb, gallery_emb, query_labels, gallery_labels), chunk_size)


def _faiss_topk(query: torch.Tensor, gallery: torch.Tensor, k: int) -> torch.Tensor:
    try:
        import faiss  # lazy: optional dependency
    except ImportError as err:
        raise ImportError(
            "use_faiss=True needs the faiss library: `pip install faiss-cpu` "
            "(or `pip install e2-adapter[faiss]`)"
        ) from err
    # float32 C-contiguous arrays are handed over without a copy
    q = np.ascontiguousarray(query.detach().cpu().numpy(), dtype=np.float32)
    g = np.ascontiguousarray(gallery.detach().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(g.shape[1])  # inner product on unit vectors = cosine
    index.add(g)
    _, idx = index.search(q, k)
    return torch.from_numpy(idx.astype(np.int64))


def _hits(q: torch.Tensor, g: torch.Tensor, q_ids: torch.Tensor, g_ids: torch.Tensor, ks: tuple[int, ...],
          chunk_size: int, use_faiss: bool) -> dict[int, torch.Tensor]:
    """topk_hits on prepared inputs (see ``_prepare``)."""
    if not use_faiss:
        ranks = _ranks(q, g, q_ids, g_ids, chunk_size)
        return {k: (ranks < k).cpu() for k in ks}
    top = _faiss_topk(q, g, min(max(ks), g.shape[0]))  # [Q, k_max]
    match = g_ids.cpu()[top] == q_ids.cpu()[:, None]
    return {k: match[:, :k].any(dim=1) for k in ks}


def topk_hits(
    query_emb: Any,
    gallery_emb: Any,
    query_labels: Any,
    gallery_labels: Any,
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int = 1024,
    use_faiss: bool = False,
) -> dict[int, torch.Tensor]:
    """For each k in ``ks``: bool [Q], whether a gallery item with the query's
    label (e.g. product id) is among the query's top k by cosine similarity."""
    ks = _check_ks(ks)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _hits(*_prepare(query_emb, gallery_emb, query_labels, gallery_labels), ks, chunk_size, use_faiss)


# ---------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------


def _percent(hits: torch.Tensor) -> float:
    return float(hits.double().mean().item() * 100.0)


def _metrics(t2i: dict[int, torch.Tensor], i2t: dict[int, torch.Tensor]) -> dict[str, float]:
    out = {f"t2i_R{k}": _percent(t2i[k]) for k in DEFAULT_KS}
    out.update({f"i2t_R{k}": _percent(i2t[k]) for k in DEFAULT_KS})
    out["SumR"] = sum(out[key] for key in METRIC_KEYS[:-1])
    return out


def _paired_per_product(image_emb: Any, text_emb: Any, protocol: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked embeddings for the protocols that take one image and one text per product."""
    img = _as_embeddings(image_emb, "image_emb")
    txt = _as_embeddings(text_emb, "text_emb")
    _check_pair(img, txt, "image_emb", "text_emb")
    if img.shape[0] != txt.shape[0]:
        raise ValueError(
            f"{protocol} needs one image and one text per product: "
            f"image_emb has {img.shape[0]} rows, text_emb has {txt.shape[0]}"
        )
    return img, txt


def product_full(
    image_emb: Any, text_emb: Any, chunk_size: int = 1024, use_faiss: bool = False
) -> dict[str, Any]:
    """product-full: row i of ``image_emb`` (the first image of product i) and
    row i of ``text_emb`` (its text) form the only matching pair; N x N ranking."""
    img, txt = _paired_per_product(image_emb, text_emb, "product_full")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    txt = txt.to(dtype=img.dtype, device=img.device)
    ids = torch.arange(img.shape[0], device=img.device)
    t2i = _hits(txt, img, ids, ids, DEFAULT_KS, chunk_size, use_faiss)
    i2t = _hits(img, txt, ids, ids, DEFAULT_KS, chunk_size, use_faiss)
    n = img.shape[0]
    return {**_metrics(t2i, i2t), "protocol": PRODUCT_FULL,
            "n_queries": 2 * n, "n_queries_t2i": n, "n_queries_i2t": n}


def image_full(
    image_emb: Any,
    image_products: Any,
    text_emb: Any,
    text_products: Any,
    chunk_size: int = 1024,
    use_faiss: bool = False,
) -> dict[str, Any]:
    """image-full: every image ranks every product text (i2t) and every text
    ranks every image (t2i); a hit is any item of the query's product in the top k."""
    img = _as_embeddings(image_emb, "image_emb")
    txt = _as_embeddings(text_emb, "text_emb")
    _check_pair(img, txt, "image_emb", "text_emb")
    _check_len(image_products, img.shape[0], "image_products", "image_emb")
    _check_len(text_products, txt.shape[0], "text_products", "text_emb")
    # A query whose product is missing on the other side can never hit; that
    # is a bug in the caller's glue, not a retrieval failure, so refuse it.
    img_set = set(_as_label_array(image_products, "image_products").tolist())
    txt_set = set(_as_label_array(text_products, "text_products").tolist())
    for missing, side in ((img_set - txt_set, "text"), (txt_set - img_set, "image")):
        if missing:
            examples = sorted(map(str, missing))[:5]
            raise ValueError(f"{len(missing)} product(s) have no {side}, e.g. {examples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    txt = txt.to(dtype=img.dtype, device=img.device)
    txt_ids, img_ids = (ids.to(img.device) for ids in _encode_labels(text_products, image_products))
    t2i = _hits(txt, img, txt_ids, img_ids, DEFAULT_KS, chunk_size, use_faiss)
    i2t = _hits(img, txt, img_ids, txt_ids, DEFAULT_KS, chunk_size, use_faiss)
    return {**_metrics(t2i, i2t), "protocol": IMAGE_FULL,
            "n_queries": txt.shape[0] + img.shape[0],
            "n_queries_t2i": txt.shape[0], "n_queries_i2t": img.shape[0]}


@dataclass
class CandidateSets:
    """Sampled sample-100 candidate lists for one repeat.

    ``candidates[i, 0]`` is the positive (== ``queries[i]``); the remaining
    columns are negatives. ``n_same_group[i]`` counts negatives from the query's
    own group.
    """

    queries: np.ndarray        # [n] int64 product indices
    candidates: np.ndarray     # [n, 1 + n_negatives] int64 product indices
    n_same_group: np.ndarray   # [n] int64
    all_negatives: bool        # True when every other product is a negative (P <= n_negatives + 1)
    note: str


def sample_100_candidates(
    groups: Sequence[str],
    n_queries: int = 1000,
    n_negatives: int = 100,
    seed: int | Sequence[int] = 0,
) -> CandidateSets:
    """Draw KaleidoBERT-style candidate sets over products 0..P-1.

    Queries: ``min(n_queries, P)`` distinct products. Negatives: drawn without
    replacement from the query's group; when the group is too small, all of it
    is used and the rest is drawn from other groups. When P <= n_negatives + 1
    every other product is a negative.
    """
    groups = list(groups)
    n_products = len(groups)
    if n_products < 2:
        raise ValueError(f"sample-100 needs at least 2 products, got {n_products}")
    if n_queries < 1 or n_negatives < 1:
        raise ValueError(f"n_queries and n_negatives must be >= 1, got {n_queries}, {n_negatives}")
    rng = np.random.default_rng(seed)
    n_q = min(n_queries, n_products)
    queries = np.sort(rng.choice(n_products, size=n_q, replace=False)).astype(np.int64)
    # Groups as small ints: fast equality tests whatever the label type.
    group_index: dict[Any, int] = {}
    group_arr = np.array([group_index.setdefault(grp, len(group_index)) for grp in groups])

    notes = []
    if n_q < n_queries:
        notes.append(f"only {n_products} products: all used as queries")

    if n_products <= n_negatives + 1:
        notes.append(f"P={n_products} <= {n_negatives + 1}: all other products used as negatives")
        everyone = np.arange(n_products, dtype=np.int64)
        candidates = np.stack([np.concatenate(([q], np.delete(everyone, q))) for q in queries])
        same = np.array([(group_arr == group_arr[q]).sum() - 1 for q in queries], dtype=np.int64)
        return CandidateSets(queries, candidates, same, True, "; ".join(notes))

    members = [np.flatnonzero(group_arr == grp) for grp in range(len(group_index))]
    others: dict[int, np.ndarray] = {}  # complement of each group, built lazily

    rows, same_counts, topped_up = [], [], 0
    for q in queries:
        grp = group_arr[q]
        pool = members[grp][members[grp] != q]
        if len(pool) >= n_negatives:
            negs = rng.choice(pool, size=n_negatives, replace=False)
        else:
            if grp not in others:
                others[grp] = np.flatnonzero(group_arr != grp)
            extra = rng.choice(others[grp], size=n_negatives - len(pool), replace=False)
            negs = np.concatenate((pool, extra))
            topped_up += 1
        rows.append(np.concatenate(([q], negs)))
        same_counts.append(min(len(pool), n_negatives))
    if topped_up:
        notes.append(f"{topped_up} of {n_q} queries topped up with negatives from other groups")
    return CandidateSets(queries, np.stack(rows).astype(np.int64),
                         np.asarray(same_counts, dtype=np.int64), False, "; ".join(notes))


def _candidate_hits(
    query: torch.Tensor, gallery: torch.Tensor, sets: CandidateSets, chunk_size: int
) -> dict[int, torch.Tensor]:
    """Rank each query's positive (column 0) among its own candidates only."""
    queries = torch.from_numpy(sets.queries).to(query.device)
    cands = torch.from_numpy(sets.candidates).to(query.device)
    ranks = []
    for start in range(0, len(queries), chunk_size):
        sims = query[queries[start:start + chunk_size]] @ gallery.T       # [c, P]
        cand_sims = sims.gather(1, cands[start:start + chunk_size])       # [c, 1 + n_neg]
        ranks.append((cand_sims[:, 1:] >= cand_sims[:, :1]).sum(dim=1))  # ties count against
    rank = torch.cat(ranks).cpu()
    return {k: rank < k for k in DEFAULT_KS}


def sample_100(
    image_emb: Any,
    text_emb: Any,
    groups: Sequence[str],
    n_queries: int = 1000,
    n_negatives: int = 100,
    repeats: int = 5,
    seed: int = 0,
    chunk_size: int = 1024,
) -> dict[str, Any]:
    """sample-100: rank each query's positive among itself + ``n_negatives``
    same-group negatives, text->image and image->text, averaged over ``repeats``.

    Row i of ``image_emb`` / ``text_emb`` / ``groups`` describes product i
    (groups are sub-categories). Repeat r draws its candidates with seed
    ``(seed, r)``; both directions use the same query products and negatives
    so the two directions are directly comparable. ``SumR_std`` is the
    standard deviation of SumR across repeats; ``note`` says when fewer
    queries or negatives than asked were possible.
    """
    img, txt = _paired_per_product(image_emb, text_emb, "sample_100")
    _check_len(groups, img.shape[0], "groups", "image_emb")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    txt = txt.to(dtype=img.dtype, device=img.device)

    per_repeat, notes = [], []
    for r in range(repeats):
        sets = sample_100_candidates(groups, n_queries, n_negatives, seed=(seed, r))
        if sets.note and sets.note not in notes:  # identical across repeats when P is small
            notes.append(sets.note)
        t2i = _candidate_hits(txt, img, sets, chunk_size)
        i2t = _candidate_hits(img, txt, sets, chunk_size)
        per_repeat.append(_metrics(t2i, i2t))

    out: dict[str, Any] = {key: float(np.mean([m[key] for m in per_repeat])) for key in METRIC_KEYS}
    n_q = len(sets.queries)
    out.update(
        protocol=SAMPLE_100,
        n_queries=2 * n_q,
        n_queries_t2i=n_q,
        n_queries_i2t=n_q,
        n_negatives=sets.candidates.shape[1] - 1,
        repeats=repeats,
        SumR_std=float(np.std([m["SumR"] for m in per_repeat])),
        note=" | ".join(notes),
    )
    return out


PROTOCOLS = {PRODUCT_FULL: product_full, IMAGE_FULL: image_full, SAMPLE_100: sample_100}
