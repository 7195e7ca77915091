"""Evaluation on precomputed embeddings: retrieval protocols, linear probes, reports.

Everything here takes embeddings (numpy arrays or torch tensors) and labels;
computing the embeddings from a model is the caller's job.
"""

from .linear_probe import linear_probe, probe_entities
from .report import mean_std_table, results_to_markdown, save_json
from .retrieval import (
    IMAGE_FULL,
    METRIC_KEYS,
    PRODUCT_FULL,
    PROTOCOLS,
    SAMPLE_100,
    CandidateSets,
    first_positive_rank,
    image_full,
    product_full,
    sample_100,
    sample_100_candidates,
    topk_hits,
)

__all__ = [
    "IMAGE_FULL",
    "METRIC_KEYS",
    "PRODUCT_FULL",
    "PROTOCOLS",
    "SAMPLE_100",
    "CandidateSets",
    "first_positive_rank",
    "image_full",
    "linear_probe",
    "mean_std_table",
    "probe_entities",
    "product_full",
    "results_to_markdown",
    "sample_100",
    "sample_100_candidates",
    "save_json",
    "topk_hits",
]
