"""Tests for e2_adapter.evaluation: exact recalls on hand-made embeddings."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from e2_adapter.evaluation import (
    METRIC_KEYS,
    first_positive_rank,
    image_full,
    linear_probe,
    mean_std_table,
    probe_entities,
    product_full,
    results_to_markdown,
    sample_100,
    sample_100_candidates,
    save_json,
    topk_hits,
)

# ---------------------------------------------------------------------------
# Hand-made embeddings
# ---------------------------------------------------------------------------


def circulant_third(p: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Images = identity, text i = row i of a circulant matrix in which the two
    products after i score higher than i itself. Every row has the same norm,
    so in both directions the positive is ranked exactly 3rd."""
    f = torch.full((p,), 0.1)
    f[0], f[1], f[2] = 0.8, 1.0, 0.9
    text = torch.stack([f.roll(i) for i in range(p)])  # text[i, j] = f[(j - i) % p]
    return torch.eye(p), text


def rows_with_ranks(ranks: list[int], g: int) -> torch.Tensor:
    """Query i has its positive (gallery item i, identity gallery) exactly at
    0-based rank ranks[i]: ranks[i] negatives score 1.0, the positive 0.5."""
    q = torch.full((len(ranks), g), 0.1)
    for i, r in enumerate(ranks):
        q[i, i] = 0.5
        negatives = [j for j in range(g) if j != i][:r]
        q[i, negatives] = 1.0
    return q


def reference_hits(q, g, q_lab, g_lab, ks):
    """Unchunked reference: full similarity matrix, sort, first positive position."""
    q = torch.nn.functional.normalize(torch.as_tensor(q, dtype=torch.float64), dim=1)
    g = torch.nn.functional.normalize(torch.as_tensor(g, dtype=torch.float64), dim=1)
    order = (q @ g.T).argsort(dim=1, descending=True)
    match = torch.as_tensor(g_lab)[order] == torch.as_tensor(q_lab)[:, None]
    first = match.int().argmax(dim=1)
    return {k: first < k for k in ks}


# ---------------------------------------------------------------------------
# Ranker
# ---------------------------------------------------------------------------


def test_topk_hits_known_ranks():
    ranks = [0] * 8 + [2] * 4 + [4] * 2 + [7] * 3 + [12] * 3  # 20 queries
    q = rows_with_ranks(ranks, g=20)
    ids = list(range(20))
    assert first_positive_rank(q, torch.eye(20), ids, ids).tolist() == ranks
    hits = topk_hits(q, torch.eye(20), ids, ids, ks=(1, 5, 10))
    assert hits[1].float().mean().item() == pytest.approx(8 / 20)
    assert hits[5].float().mean().item() == pytest.approx(14 / 20)
    assert hits[10].float().mean().item() == pytest.approx(17 / 20)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1024])
def test_chunked_equals_unchunked_reference(chunk_size):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(150, 32, generator=gen)
    g = torch.randn(200, 32, generator=gen)
    g_lab = torch.arange(200) % 40  # 5 gallery items per label
    q_lab = torch.randint(0, 40, (150,), generator=gen)
    ks = (1, 5, 10, 50)
    ours = topk_hits(q, g, q_lab, g_lab, ks=ks, chunk_size=chunk_size)
    ref = reference_hits(q, g, q_lab, g_lab, ks)
    for k in ks:
        assert torch.equal(ours[k], ref[k]), k
    assert 0 < ours[5].sum() < 150  # a non-trivial case


def test_ties_go_against_the_positive_and_ignore_gallery_order():
    const = torch.ones(20, 4)  # a collapsed encoder: every similarity equal
    ids = list(range(20))
    assert (first_positive_rank(const, const, ids, ids) == 19).all()
    assert product_full(const, const)["SumR"] == 0.0
    # Permuting the gallery never changes a rank.
    gen = torch.Generator().manual_seed(1)
    q, g = torch.randn(30, 8, generator=gen), torch.randn(30, 8, generator=gen)
    perm = torch.randperm(30, generator=gen)
    a = first_positive_rank(q, g, ids + list(range(20, 30)), torch.arange(30))
    b = first_positive_rank(q, g[perm], ids + list(range(20, 30)), perm)
    assert torch.equal(a, b)


def test_string_labels_and_missing_positive():
    q = torch.eye(3)
    hits = topk_hits(q, torch.eye(3), ["a", "b", "zzz"], ["a", "b", "c"], ks=(3,))
    assert hits[3].tolist() == [True, True, False]  # no "zzz" in the gallery: never a hit


def test_faiss_backend_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        topk_hits(torch.eye(3), torch.eye(3), [0, 1, 2], [0, 1, 2], use_faiss=True)


def test_faiss_backend_matches_torch():
    pytest.importorskip("faiss")
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(50, 16, generator=gen), torch.randn(80, 16, generator=gen)
    q_lab, g_lab = torch.randint(0, 20, (50,), generator=gen), torch.arange(80) % 20
    a = topk_hits(q, g, q_lab, g_lab, use_faiss=True)
    b = topk_hits(q, g, q_lab, g_lab)
    assert all(torch.equal(a[k], b[k]) for k in (1, 5, 10))


# ---------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------


def test_product_full_identity():
    res = product_full(np.eye(16), np.eye(16))
    assert all(res[k] == 100.0 for k in METRIC_KEYS[:-1])
    assert res["SumR"] == 600.0
    assert res["protocol"] == "product-full"
    assert (res["n_queries_t2i"], res["n_queries_i2t"], res["n_queries"]) == (16, 16, 32)


def test_product_full_positive_always_third():
    img, txt = circulant_third(20)
    res = product_full(img, txt, chunk_size=3)
    assert (res["t2i_R1"], res["t2i_R5"], res["t2i_R10"]) == (0.0, 100.0, 100.0)
    assert (res["i2t_R1"], res["i2t_R5"], res["i2t_R10"]) == (0.0, 100.0, 100.0)
    assert res["SumR"] == 400.0


def test_image_full_identity_several_images_per_product():
    gen = torch.Generator().manual_seed(0)
    protos = torch.eye(8)
    img_products = [f"p{i // 3}" for i in range(24)]  # 3 images per product
    imgs = protos[[i // 3 for i in range(24)]] + 0.01 * torch.randn(24, 8, generator=gen)
    order = [5, 2, 7, 0, 1, 6, 3, 4]  # texts need not follow image order
    res = image_full(imgs, img_products, protos[order], [f"p{i}" for i in order])
    assert res["SumR"] == 600.0
    assert (res["n_queries_t2i"], res["n_queries_i2t"], res["protocol"]) == (8, 24, "image-full")


def test_image_full_mixed_known_fractions():
    # Product p has two images: e_p (correct) and e_{p+1} (looks like the next product).
    p = 6
    eye = torch.eye(p)
    imgs = torch.stack([eye[(q + j) % p] for q in range(p) for j in (0, 1)])
    img_products = [q for q in range(p) for _ in (0, 1)]
    res = image_full(imgs, img_products, eye, list(range(p)))
    # i2t: e_p images hit at rank 0; e_{p+1} images rank 5 (1 better + 4 tied at 0).
    assert (res["i2t_R1"], res["i2t_R5"], res["i2t_R10"]) == (50.0, 50.0, 100.0)
    # t2i: text p ties with image (p-1, 1) == e_p, which counts against it: rank 1.
    assert (res["t2i_R1"], res["t2i_R5"], res["t2i_R10"]) == (0.0, 100.0, 100.0)
    assert res["SumR"] == pytest.approx(400.0)


def test_image_full_product_without_text_is_an_error():
    with pytest.raises(ValueError, match="no text"):
        image_full(torch.eye(3), [0, 1, 2], torch.eye(3)[:2], [0, 1])


def test_sample_100_identity_and_positive_third():
    groups = ["a"] * 10 + ["b"] * 10
    res = sample_100(torch.eye(20), torch.eye(20), groups)
    assert res["SumR"] == 600.0 and res["protocol"] == "sample-100"
    img, txt = circulant_third(20)  # P <= 101: every other product is a candidate
    res = sample_100(img, txt, groups)
    assert (res["t2i_R1"], res["t2i_R5"], res["t2i_R10"]) == (0.0, 100.0, 100.0)
    assert (res["i2t_R1"], res["i2t_R5"], res["i2t_R10"]) == (0.0, 100.0, 100.0)
    assert res["n_negatives"] == 19 and "all other products" in res["note"]


def test_sample_100_mixed_known_fraction():
    p = 300
    img = torch.eye(p)
    txt = torch.eye(p)
    txt[1::2] *= -1  # odd products: the positive is the least similar candidate
    groups = [f"g{i % 3}" for i in range(p)]
    res = sample_100(img, txt, groups, n_queries=p, repeats=2, chunk_size=64)
    assert all(res[k] == 50.0 for k in METRIC_KEYS[:-1])
    assert res["n_negatives"] == 100 and res["n_queries_t2i"] == p


def test_sample_100_deterministic_for_seed():
    gen = torch.Generator().manual_seed(0)
    img, txt = torch.randn(400, 16, generator=gen), torch.randn(400, 16, generator=gen)
    groups = [f"g{i % 4}" for i in range(400)]
    a = sample_100(img, txt, groups, n_queries=200, repeats=3, seed=7)
    b = sample_100(img, txt, groups, n_queries=200, repeats=3, seed=7)
    c = sample_100(img, txt, groups, n_queries=200, repeats=3, seed=8)
    assert a == b
    assert a != c


def test_sampler_same_group_negatives_with_top_up():
    groups = ["A"] * 200 + ["B"] * 60 + ["C"] * 40
    sets = sample_100_candidates(groups, n_queries=300, n_negatives=100, seed=0)
    assert not sets.all_negatives
    assert sets.candidates.shape == (300, 101)
    assert np.array_equal(sets.candidates[:, 0], sets.queries)
    g = np.asarray(groups)
    for q, row, n_same in zip(sets.queries, sets.candidates, sets.n_same_group):
        negs = row[1:]
        assert len(set(negs.tolist())) == 100 and q not in negs
        from_own = int((g[negs] == g[q]).sum())
        expected = min(int((g == g[q]).sum()) - 1, 100)  # 100 for A, 59 for B, 39 for C
        assert from_own == n_same == expected
    assert "topped up" in sets.note


def test_sampler_deterministic_and_small_p():
    groups = [f"g{i % 5}" for i in range(500)]
    a = sample_100_candidates(groups, n_queries=50, seed=3)
    b = sample_100_candidates(groups, n_queries=50, seed=3)
    c = sample_100_candidates(groups, n_queries=50, seed=4)
    assert np.array_equal(a.candidates, b.candidates)
    assert not np.array_equal(a.candidates, c.candidates)
    assert len(set(a.queries.tolist())) == 50

    small = sample_100_candidates(["x"] * 30 + ["y"] * 20, n_queries=1000, seed=0)
    assert small.all_negatives and small.candidates.shape == (50, 50)
    assert all(sorted(row.tolist()) == list(range(50)) for row in small.candidates)
    assert "all other products" in small.note and "all used as queries" in small.note


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: product_full(torch.eye(4), torch.eye(4)[:3]), "one image and one text"),
        (lambda: product_full(torch.eye(4), torch.ones(4, 3)), "widths differ"),
        (lambda: product_full(torch.zeros(0, 4), torch.zeros(0, 4)), "empty"),
        (lambda: product_full(torch.ones(4), torch.ones(4)), "2-D"),
        (lambda: product_full(torch.full((3, 3), float("nan")), torch.eye(3)), "NaN"),
        (lambda: image_full(torch.eye(3), [0, 1], torch.eye(3), [0, 1, 2]), "image_products has 2"),
        (lambda: sample_100(torch.eye(3), torch.eye(3), ["a", "b"]), "groups has 2"),
        (lambda: sample_100(torch.eye(1), torch.eye(1), ["a"]), "at least 2 products"),
        (lambda: topk_hits(torch.eye(3), torch.eye(3), [0, 1, 2], [0, 1, 2], ks=(0,)), "ks"),
        (lambda: topk_hits(torch.eye(3), torch.eye(3), [0, 1, 2], [0, 1, 2], chunk_size=0), "chunk"),
    ],
)
def test_retrieval_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------


def clusters(n_per_class: int, n_classes: int, dim: int, seed: int, spread: float = 0.1):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.eye(dim)[:n_classes] * 3
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centers[y] + spread * torch.randn(len(y), dim, generator=gen)
    return x, [f"class{int(c)}" for c in y]


def test_linear_probe_separable_clusters():
    xtr, ytr = clusters(40, 6, 16, seed=0)
    xte, yte = clusters(20, 6, 16, seed=1)
    res = linear_probe(xtr, ytr, xte, yte)
    assert res == {"accuracy": 100.0, "n_classes": 6, "n_train": 240, "n_test": 120,
                   "n_test_unseen": 0}


def test_linear_probe_random_labels_near_chance_and_deterministic():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 32)).astype(np.float32)
    y = [f"c{v}" for v in rng.integers(0, 10, size=2000)]
    res = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:])
    assert 4.0 < res["accuracy"] < 16.0  # chance is 10%
    assert linear_probe(x[:1000], y[:1000], x[1000:], y[1000:]) == res


def test_linear_probe_unseen_test_labels_count_as_wrong():
    xtr, ytr = clusters(30, 4, 8, seed=0)
    xte, yte = clusters(10, 5, 8, seed=1)  # class4 never appears in training
    res = linear_probe(xtr, ytr, xte, yte)
    assert res["n_test_unseen"] == 10 and res["n_classes"] == 4
    assert res["accuracy"] == pytest.approx(80.0)


def test_linear_probe_at_realistic_size():
    xtr, ytr = clusters(60, 50, 512, seed=0, spread=0.5)  # 3000 items, 512-D, 50 classes
    xte, yte = clusters(10, 50, 512, seed=1, spread=0.5)
    res = linear_probe(xtr, ytr, xte, yte)
    assert res["accuracy"] > 95.0


def test_probe_entities_skips_missing_tags():
    xtr, ytr = clusters(30, 3, 8, seed=0)
    xte, yte = clusters(10, 3, 8, seed=1)
    train_tags = {"color": ytr, "brand": ["" if i % 2 else t for i, t in enumerate(ytr)]}
    test_tags = {"color": yte, "brand": [None if i % 2 else t for i, t in enumerate(yte)]}
    res = probe_entities(xtr, train_tags, xte, test_tags)
    assert res == {"color": 100.0, "brand": 100.0}
    with pytest.raises(ValueError, match="entities differ"):
        probe_entities(xtr, train_tags, xte, {"color": yte})


def test_linear_probe_errors():
    x = torch.eye(4)
    with pytest.raises(ValueError, match="train_y has 3 labels"):
        linear_probe(x, ["a", "b", "c"], x, list("abcd"))
    with pytest.raises(ValueError, match="widths differ"):
        linear_probe(x, list("abab"), torch.eye(3), list("aba"))


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------


def test_results_to_markdown_rows_and_columns():
    img, txt = circulant_third(20)
    rows = {"CLIP": product_full(img, txt), "E2": product_full(torch.eye(20), torch.eye(20))}
    md = results_to_markdown(rows)
    lines = md.strip().splitlines()
    assert lines[0] == "| model | " + " | ".join(METRIC_KEYS) + " |"
    assert len(lines) == 4 and lines[1].count("---") == 8
    assert lines[2] == "| CLIP | 0.0 | 100.0 | 100.0 | 0.0 | 100.0 | 100.0 | 400.0 |"
    assert lines[3].startswith("| E2 | 100.0 |")

    md = results_to_markdown({"a": {"acc": 1.234, "n": 7}, "b": {"acc": 2.0}}, columns=["acc", "n"])
    assert md.splitlines()[2:] == ["| a | 1.2 | 7 |", "| b | 2.0 | - |"]


def test_mean_std_table():
    runs = {"E2": [{"SumR": 1.0}, {"SumR": 2.0}, {"SumR": 3.0}], "CLIP": [{"SumR": 5.0}]}
    lines = mean_std_table(runs).strip().splitlines()
    assert lines[0] == "| model | n | SumR |"
    assert lines[2] == "| E2 | 3 | 2.0 ± 1.0 |"
    assert lines[3] == "| CLIP | 1 | 5.0 ± 0.0 |"
    with pytest.raises(ValueError, match="no runs"):
        mean_std_table({"E2": []})


def test_save_json_atomic(tmp_path):
    path = tmp_path / "out" / "results.json"
    save_json(path, {"SumR": np.float32(1.5), "ranks": np.arange(3), "t": torch.tensor([1.0])})
    assert json.loads(path.read_text()) == {"SumR": 1.5, "ranks": [0, 1, 2], "t": [1.0]}
    with pytest.raises(TypeError):
        save_json(path, {"bad": object()})
    assert json.loads(path.read_text())["SumR"] == 1.5  # the old file survives a failed write
    assert os.listdir(path.parent) == ["results.json"]  # no temporary file left behind
