"""Popularity baseline: counts from training parts only, ranked like a naive implementation."""
import numpy as np
import pytest

from hellm_ds.baselines.popularity import evaluate_popularity, popularity_scores
from hellm_ds.data.dataset import load_dataset
from tests.conftest import shared_dataset


def test_counts_use_training_parts_only(tmp_path):
    (tmp_path / "sequences.txt").write_text("1 1 2 3 4\n2 2 3 5\n3 5 6\n")
    ds = load_dataset(tmp_path)
    # training parts: [1, 2], [2], [5, 6] (a 2-item user trains on everything)
    assert popularity_scores(ds).tolist() == [0, 1, 2, 0, 0, 1, 1]


def test_matches_naive_ranking(synth_dir):
    ds = load_dataset(synth_dir)
    res = evaluate_popularity(ds, progress=False)
    counts = ds.item_train_counts()
    for split in ("valid", "test"):
        sp = ds.split(split)
        for proto in ("paper", "filtered"):
            hits = []
            for t, a, b in zip(sp.targets, sp.hist_start, sp.hist_end):
                hist = set(ds.items[a:b].tolist()) if proto == "filtered" else set()
                above = sum(1 for i in range(1, ds.n_items + 1) if i != t and i not in hist and counts[i] > counts[t])
                hits.append(above < 10 and t not in hist)
            assert res[split][proto]["Recall@10"] == pytest.approx(np.mean(hits))


@pytest.mark.realdata
def test_toys_popularity_figures():
    res = evaluate_popularity(load_dataset(shared_dataset("toys")), splits=("test",), progress=False)
    # recorded in the README; popularity is deterministic, so these are exact up to float summation
    assert res["test"]["paper"]["Recall@10"] == pytest.approx(0.0089, abs=5e-5)
    assert res["test"]["paper"]["NDCG@10"] == pytest.approx(0.0049, abs=5e-5)
