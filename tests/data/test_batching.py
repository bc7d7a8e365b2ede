"""Left-padding collator and the distributed-aware sampler."""
import numpy as np
import pytest
import torch

from hellm_ds.data.batching import NextItemExamples, ShardedSampler, left_pad
from hellm_ds.data.dataset import load_dataset


def test_left_pad_right_aligns_and_truncates():
    items = np.arange(1, 11)
    out = left_pad(items, np.array([0, 3, 5]), np.array([2, 8, 6]), max_len=4)
    assert out.tolist() == [[0, 0, 1, 2], [5, 6, 7, 8], [0, 0, 0, 6]]


def test_collate_matches_per_sample_histories(synth_dir):
    ds = load_dataset(synth_dir, max_len=8)
    for split in ("train", "valid", "test"):
        ex = NextItemExamples(ds, split)
        idx = np.random.default_rng(0).choice(len(ex), 33, replace=False)
        b = ex.collate(idx.tolist())
        assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape[0] == 33
        assert torch.equal(b["attention_mask"], (b["input_ids"] != 0).long())
        for row, i in enumerate(idx):
            hist = ds.items[ex.starts[i] : ex.ends[i]][-8:]
            L = len(hist)
            assert b["input_ids"][row, -L:].tolist() == hist.tolist()
            assert (b["input_ids"][row, :-L] == 0).all()
            assert b["lengths"][row] == L
            assert b["targets"][row] == ex.targets[i]


def test_train_examples_cover_every_prefix(synth_dir):
    ds = load_dataset(synth_dir)
    ex = NextItemExamples(ds, "train")
    u = 5
    seq = ds.history(u).tolist()[:-2]
    mine = [i for i in range(len(ex)) if ex.users[i] == u]
    b = ex.collate(mine)
    got = [(row[row > 0].tolist(), t) for row, t in zip(b["input_ids"], b["targets"].tolist())]
    assert got == [(seq[:j], seq[j]) for j in range(1, len(seq))]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover(world):
    n = 103
    shards = [ShardedSampler(n, world, r, seed=5, drop_last=False).indices() for r in range(world)]
    allidx = np.concatenate(shards)
    assert sorted(allidx.tolist()) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(ShardedSampler(n, world, r, drop_last=False)) for r in range(world)] == list(map(len, shards))
    dropped = [ShardedSampler(n, world, r, seed=5).indices() for r in range(world)]
    assert len({len(s) for s in dropped}) == 1 and len(set(np.concatenate(dropped))) == n - n % world


def test_sampler_deterministic_by_seed_and_epoch():
    a = ShardedSampler(50, 2, 0, seed=1)
    b = ShardedSampler(50, 2, 0, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert list(ShardedSampler(50, 2, 0, seed=2)) != list(ShardedSampler(50, 2, 0, seed=1))


def test_sampler_rejects_bad_rank():
    with pytest.raises(ValueError):
        ShardedSampler(10, 2, 2)


def test_dataloader_integration(synth_dir):
    ds = load_dataset(synth_dir)
    ex = NextItemExamples(ds, "train")
    loader = torch.utils.data.DataLoader(ex, batch_size=16, sampler=ShardedSampler(len(ex), 1, 0), collate_fn=ex.collate)
    n = sum(b["targets"].numel() for b in loader)
    assert n == len(ex)
