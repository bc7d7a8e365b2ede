"""Popularity baseline: every user gets the same ranking, items ordered by how often they occur in the
training parts of all (truncated) sequences. The floor any recommender must clear."""
from __future__ import annotations

import torch

from hellm_ds.data.dataset import Dataset
from hellm_ds.eval.evaluator import evaluate_splits


def popularity_scores(dataset: Dataset) -> torch.Tensor:
    """float64 [n_items + 1]: training-part occurrence counts (entry 0 is padding)."""
    return torch.from_numpy(dataset.item_train_counts()).to(torch.float64)


def evaluate_popularity(dataset: Dataset, **kwargs) -> dict:
    """Metrics JSON ``{"valid": {"paper": …, "filtered": …}, "test": …, "ties": rule}`` of the popularity
    ranking (items with equal counts tie: the ``expected`` rule averages over their orders)."""
    counts = popularity_scores(dataset)[:, None]  # a 1-d "embedding" per item; users are all [1.0]
    return evaluate_splits(
        dataset,
        lambda batch: torch.ones(batch["targets"].shape[0], 1, dtype=torch.float64),
        item_vectors=counts,
        **kwargs,
    )
