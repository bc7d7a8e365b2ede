"""The synthetic generator: deterministic bytes, valid format, structure a model can learn."""
import hashlib

import numpy as np
import pytest
import torch

from hellm_ds.baselines.popularity import evaluate_popularity
from hellm_ds.data.dataset import load_dataset
from hellm_ds.data.synth import SynthConfig, write_synthetic
from hellm_ds.errors import UsageError
from hellm_ds.eval.evaluator import evaluate


def digest(d):
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    cfg = SynthConfig(users=200, items=60, seed=3)
    a = write_synthetic(tmp_path / "a", cfg)
    b = write_synthetic(tmp_path / "b", cfg)
    c = write_synthetic(tmp_path / "c", SynthConfig(users=200, items=60, seed=4))
    assert digest(a) == digest(b) != digest(c)


def test_layout_and_sizes(tmp_path):
    d = write_synthetic(tmp_path / "d", SynthConfig(users=300, items=90, seed=0))
    ds = load_dataset(d)
    assert ds.n_users == 300 and ds.n_items == 90
    assert set(ds.modalities) == {"attributes", "image", "text"}
    assert (ds.lengths >= 3).all()
    assert ds.item_texts is not None and all(ds.item_texts[1:])


def test_refuses_to_overwrite_and_rejects_bad_sizes(tmp_path):
    d = write_synthetic(tmp_path / "d", SynthConfig(users=20, items=10))
    with pytest.raises(FileExistsError):
        write_synthetic(d, SynthConfig(users=20, items=10))
    with pytest.raises(UsageError):
        write_synthetic(tmp_path / "e", SynthConfig(users=0, items=10))
    assert not (tmp_path / "e").exists()


def test_popularity_is_power_law(synth_dir):
    counts = np.sort(load_dataset(synth_dir).item_train_counts()[1:])[::-1]
    top = counts[: len(counts) // 10].sum() / counts.sum()
    assert top > 0.18  # the top 10% of items take about twice their share (uniform: 10%)
    assert counts[0] > 3 * np.median(counts)


def test_planted_sequential_structure_beats_popularity(synth_dir):
    """A first-order transition counter fitted on training prefixes clearly beats popularity."""
    ds = load_dataset(synth_dir)
    I = ds.n_items
    trans = np.zeros((I + 1, I + 1))
    s = ds.train_samples
    np.add.at(trans, (ds.items[s.target_pos - 1], ds.items[s.target_pos]), 1.0)
    pop = ds.item_train_counts().astype(float)
    scores = torch.from_numpy(trans + 1e-3 * pop / pop.max())

    def markov(batch):
        return scores[batch["input_ids"][:, -1]]

    m = evaluate(ds, "test", markov, progress=False)
    p = evaluate_popularity(ds, splits=("test",), progress=False)["test"]
    for proto in ("paper", "filtered"):
        assert m[proto]["NDCG@10"] > 2 * p[proto]["NDCG@10"]
        assert m[proto]["Recall@10"] > p[proto]["Recall@10"] + 0.1


def test_planted_features_recover_item_clusters(tmp_path):
    """Nearest neighbours in either feature modality mostly share the item's category attribute."""
    ds = load_dataset(write_synthetic(tmp_path / "d", SynthConfig(users=50, items=200, seed=1)))
    cat = ds.modalities["attributes"].rows(0, ds.n_items)[:, :8].argmax(1)  # first attribute = cluster id
    for name in ("image", "text"):
        x = ds.modalities[name].dense
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        nn = sim.argmax(1)
        assert (cat[nn] == cat).mean() > 0.8, name
