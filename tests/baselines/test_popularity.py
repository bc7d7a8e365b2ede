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


@pytest.mark.parametrize("ties", ["expected", "optimistic"])
def test_matches_naive_ranking(synth_dir, ties):
    """Items with equal counts tie: optimistic puts the target first among them, expected averages over the
    target's possible positions (the synthetic set has many equal counts, so the rules differ)."""
    ds = load_dataset(synth_dir)
    res = evaluate_popularity(ds, progress=False, ties=ties)
    assert res["ties"] == ties
    counts = ds.item_train_counts()
    for split in ("valid", "test"):
        sp = ds.split(split)
        for proto in ("paper", "filtered"):
            hits, tied_counts = [], []
            for t, a, b in zip(sp.targets, sp.hist_start, sp.hist_end):
                hist = set(ds.items[a:b].tolist()) if proto == "filtered" else set()
                others = [i for i in range(1, ds.n_items + 1) if i != t and i not in hist]
                above = sum(1 for i in others if counts[i] > counts[t])
                tied = sum(1 for i in others if counts[i] == counts[t])
                if t in hist:
                    above, tied = ds.n_items, 0
                tied_counts.append(tied)
                positions = [above] if ties == "optimistic" else range(above, above + tied + 1)
                hits.append(np.mean([r < 10 for r in positions]))
            assert res[split][proto]["Recall@10"] == pytest.approx(np.mean(hits))
            assert res[split][proto]["mean_ties"] == pytest.approx(np.mean(tied_counts))
    assert res["test"]["paper"]["mean_ties"] > 1  # the check above has ties to count


def test_tied_counts_are_spread_over_their_positions(tmp_path):
    # training parts: [1, 2], [3, 4], [5, 1]: items 2..5 occur once, item 1 twice; test targets 2, 5, 4
    (tmp_path / "sequences.txt").write_text("1 1 2 3 2\n2 3 4 1 5\n3 5 1 2 4\n")
    ds = load_dataset(tmp_path)
    kw = {"progress": False, "splits": ("test",), "ks": (1, 5)}
    with pytest.warns(UserWarning, match="ties with 75%"):  # 3 of the 4 other items
        exp = evaluate_popularity(ds, **kw)["test"]["paper"]
    with pytest.warns(UserWarning, match="meaningless"):
        opt = evaluate_popularity(ds, ties="optimistic", **kw)["test"]["paper"]
    # targets 2, 5, 4 each tie with 3 others one place below item 1: rank 1 optimistic, 1..4 expected
    assert opt["Recall@1"] == 0 and opt["Recall@5"] == 1 and opt["MRR@5"] == pytest.approx(1 / 2)
    assert exp["Recall@1"] == 0 and exp["Recall@5"] == 1
    assert exp["MRR@5"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4)
    assert exp["mean_ties"] == 3


@pytest.mark.realdata
@pytest.mark.parametrize("ties", ["expected", "optimistic"])
def test_toys_popularity_figures(ties):
    res = evaluate_popularity(load_dataset(shared_dataset("toys")), splits=("test",), progress=False, ties=ties)
    # recorded in the README; popularity is deterministic, so these are exact up to float summation. The top
    # items' counts are distinct on Toys, so both rules agree to 4 digits (ties are in the long tail)
    assert res["test"]["paper"]["Recall@10"] == pytest.approx(0.0089, abs=5e-5)
    assert res["test"]["paper"]["NDCG@10"] == pytest.approx(0.0049, abs=5e-5)
    assert res["test"]["paper"]["mean_ties"] == pytest.approx(556.86, abs=0.01)
