"""The evaluator: factorised and dense paths agree, sharding across ranks changes nothing."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hellm_ds.data.dataset import load_dataset
from hellm_ds.eval.evaluator import evaluate, evaluate_splits
from hellm_ds.utils.net import free_port


def _model(ds, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    users = torch.randn(ds.n_users, d, generator=g, dtype=torch.float64)
    items = torch.randn(ds.n_items + 1, d, generator=g, dtype=torch.float64)
    return users, items


def test_factorised_equals_dense_scores(synth_dir):
    ds = load_dataset(synth_dir)
    users, items = _model(ds)
    a = evaluate_splits(ds, lambda b: users[b["users"]], item_vectors=items, batch_size=97, progress=False)
    b = evaluate_splits(ds, lambda b: users[b["users"]] @ items.T, batch_size=64, progress=False)
    assert a["ties"] == b["ties"] == "expected"  # the results name their tie rule
    for split in ("valid", "test"):
        for proto in a[split]:
            for k in a[split][proto]:
                assert a[split][proto][k] == pytest.approx(b[split][proto][k], abs=1e-12)


def test_batch_size_and_lockstep_do_not_change_results(synth_dir):
    ds = load_dataset(synth_dir)
    users, items = _model(ds, seed=1)
    fn = lambda b: users[b["users"]]  # noqa: E731
    ref = evaluate(ds, "test", fn, item_vectors=items, batch_size=1000, progress=False)
    got = evaluate(ds, "test", fn, item_vectors=items, batch_size=7, lockstep=True, progress=False)
    for proto in ref:  # equal up to the order of float64 summation
        assert got[proto] == pytest.approx(ref[proto], abs=1e-12)


def test_unknown_protocol_is_rejected(synth_dir):
    ds = load_dataset(synth_dir)
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate(ds, "test", lambda b: None, protocols=("paper", "masked"), progress=False)


def _worker(rank, world, port, data_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = load_dataset(data_dir)
        users, items = _model(ds, seed=2)
        calls = []

        def fn(b):
            calls.append(b["users"].numel())
            return users[b["users"]]

        res = evaluate(ds, "valid", fn, item_vectors=items, batch_size=50, lockstep=True, progress=False)
        np.save(f"{out_dir}/calls{rank}.npy", np.array(calls))
        if rank == 0:
            torch.save(res, f"{out_dir}/res.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one(synth_dir, tmp_path):
    ds = load_dataset(synth_dir)
    users, items = _model(ds, seed=2)
    ref = evaluate(ds, "valid", lambda b: users[b["users"]], item_vectors=items, progress=False)
    mp.spawn(_worker, args=(2, free_port(), str(synth_dir), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "res.pt", weights_only=True)
    for proto in ref:
        for k in ref[proto]:
            assert got[proto][k] == pytest.approx(ref[proto][k], abs=1e-12)
    c0, c1 = np.load(tmp_path / "calls0.npy"), np.load(tmp_path / "calls1.npy")
    assert len(c0) == len(c1)  # lockstep: same number of forward passes on every rank
    assert c0.sum() + c1.sum() >= len(ds.split("valid"))


def test_collapsed_scores_get_chance_and_are_flagged(synth_dir):
    ds = load_dataset(synth_dir)
    items = torch.zeros(ds.n_items + 1, 4)
    user_fn = lambda b: torch.zeros(b["users"].numel(), 4)  # noqa: E731
    with pytest.warns(UserWarning, match="close to chance"):
        res = evaluate(ds, "test", user_fn, item_vectors=items, progress=False)
    assert res["paper"]["Recall@5"] == pytest.approx(5 / ds.n_items)  # the default: expected over tie orders
    assert res["paper"]["mean_ties"] == ds.n_items - 1
    with pytest.warns(UserWarning, match="meaningless"):
        res = evaluate(ds, "test", user_fn, item_vectors=items, progress=False, ties="optimistic")
    assert res["paper"]["Recall@5"] == 1.0  # ties in the target's favour: hence the warning
    with pytest.raises(ValueError, match="tie rule"):
        evaluate(ds, "test", user_fn, item_vectors=items, progress=False, ties="pessimistic")
