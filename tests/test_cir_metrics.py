"""FashionIQ metrics on hand-made rankings."""
import math

import pytest
import torch

from integrations.cir.fashioniq import (average_report, join_captions, markdown_table, ranked_names_recall,
                                        recall_at_k, target_ranks)


def test_target_ranks_from_scores():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3],    # target 2: one item ahead -> rank 1
                           [0.1, 0.2, 0.3, 0.4],    # target 3: best -> rank 0
                           [0.4, 0.4, 0.4, 0.1]])   # target 0: tied with two others -> ties count against
    assert target_ranks(scores, torch.tensor([2, 3, 0])).tolist() == [1, 0, 2]


def test_reference_exclusion_is_optional_and_never_drops_the_target():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.9, 0.1, 0.5, 0.3]])
    targets = torch.tensor([2, 0])
    assert target_ranks(scores, targets).tolist() == [1, 0]
    # query 0: its reference (item 0) outranked the target; excluded it no longer counts
    # query 1: the reference is the target itself; it stays; -1 means "no reference in the gallery"
    assert target_ranks(scores, targets, torch.tensor([0, 0])).tolist() == [0, 0]
    assert target_ranks(scores, targets, torch.tensor([-1, -1])).tolist() == [1, 0]


def test_recall_at_k():
    ranks = torch.tensor([0, 9, 10, 49, 50, 100])
    r = recall_at_k(ranks, (1, 10, 50))
    assert r == pytest.approx({"R@1": 100 / 6, "R@10": 200 / 6, "R@50": 400 / 6})
    assert math.isnan(recall_at_k(torch.tensor([]))["R@10"])


def test_recall_from_explicit_rankings():
    ranked = [["a", "b", "c"], ["c", "b", "a"], ["b", "c", "a"]]
    assert ranked_names_recall(ranked, ["a", "a", "x"], ks=(1, 3)) == pytest.approx({"R@1": 100 / 3, "R@3": 200 / 3})


def test_average_is_unweighted_over_categories():
    report = average_report({"dress": {"R@10": 20.0, "R@50": 40.0, "queries": 10},
                             "shirt": {"R@10": 30.0, "R@50": 60.0, "queries": 30}})
    assert report["average"] == {"R@10": 25.0, "R@50": 50.0, "queries": 40}
    table = markdown_table({"cirevl": report, "pic2word": report})
    assert "| dress | 20.0 | 40.0 | 20.0 | 40.0 |" in table and table.splitlines()[-1].startswith("| average")


def test_join_captions_like_cirevl_and_searle():
    assert join_captions(["Is red.", "has a logo?"]) == "Is red and has a logo"
    assert join_captions(["is red", "has a logo"], reverse=True) == "has a logo and is red"
