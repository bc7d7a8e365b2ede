"""Graph building from a dataset and the on-disk safetensors cache."""
import numpy as np
import pytest
import torch

from hellm_ds.data.dataset import load_dataset
from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.graph.build import GraphConfig, Graphs, build_graphs, cache_key, load_or_build, product_nnz
from tests.conftest import random_csr, shared_dataset


def test_build_uses_training_interactions_only(synth_dir):
    ds = load_dataset(synth_dir)
    g = build_graphs(ds, GraphConfig(knn_k=5))
    u, i = ds.train_interactions()
    assert g.R.nnz == u.size and g.R.shape == (ds.n_users, ds.n_items)
    dense = g.R.to_dense()
    assert dense[u, i - 1].sum() == u.size
    assert g.modalities == ("attributes", "image", "text")
    assert g.H.shape == (ds.n_items, 3 * ds.n_items) and (g.H.row_nnz() == 15).all()


def test_cache_roundtrip_and_key(synth_dir, tmp_path):
    ds = load_dataset(synth_dir)
    cfg = GraphConfig(knn_k=4, modalities=("image",))
    g = load_or_build(ds, cfg, tmp_path)
    files = list(tmp_path.glob("graphs-*.safetensors"))
    assert len(files) == 1 and cache_key(ds, cfg) in files[0].name
    g2 = load_or_build(ds, cfg, tmp_path)  # loaded, not rebuilt
    for a, b in ((g.R, g2.R), (g.RT, g2.RT), (g.H, g2.H), (g.HT, g2.HT)):
        assert torch.equal(a.indptr, b.indptr) and torch.equal(a.indices, b.indices) and a.shape == b.shape
    X = torch.randn(ds.n_users, 8)
    from hellm_kernels import propagate

    assert torch.equal(propagate(g.u2u(), X, 2, backend="torch"), propagate(g2.u2u(), X, 2, backend="torch"))
    load_or_build(ds, GraphConfig(knn_k=5, modalities=("image",)), tmp_path)
    assert len(list(tmp_path.glob("graphs-*.safetensors"))) == 2
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


def test_tampered_and_truncated_caches_are_refused(synth_dir, tmp_path):
    ds = load_dataset(synth_dir)
    path = build_graphs(ds, GraphConfig(knn_k=3)).save(tmp_path / "g.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFormatError):
        Graphs.load(tmp_path / "trunc.safetensors")
    g = Graphs.load(path)
    g.R.indices[0] = 10**6  # out-of-range column
    g.save(tmp_path / "bad.safetensors")
    with pytest.raises(DataFormatError, match="not a valid CSR"):
        Graphs.load(tmp_path / "bad.safetensors")


def test_unknown_modality_is_refused(synth_dir):
    with pytest.raises(UsageError, match="unknown modality"):
        build_graphs(load_dataset(synth_dir), GraphConfig(modalities=("audio",)))


def test_dataset_without_modalities_has_no_item_graph(tmp_path):
    (tmp_path / "sequences.txt").write_text("1 1 2 3\n2 2 3 4\n")
    g = build_graphs(load_dataset(tmp_path))
    assert g.H is None
    with pytest.raises(UsageError):
        g.i2i()
    assert "nnz_H" not in g.sizes()


def test_product_nnz_counts_exactly():
    for seed in range(3):
        A, dense = random_csr(50, 30, 0.1, seed=seed, hub_row=4, empty_rows=(49,))
        assert product_nnz(A, A.transpose(), budget=37) == int(((dense @ dense.T) != 0).sum())


@pytest.mark.realdata
def test_toys_sizes():
    g = build_graphs(load_dataset(shared_dataset("toys")), GraphConfig(knn_k=10))
    s = g.sizes()
    assert s["nnz_R"] == 125666
    assert 10 < s["rrt_nnz"] / s["two_stage_nnz_u2u"] < 14  # METHOD §1: 12× on Toys
    assert s["nnz_H"] == 10 * 11924
    assert np.isfinite(g.i2i().a.numpy()).all()
