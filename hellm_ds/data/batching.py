"""Next-item examples (one prefix each, or one user's whole sequence for the per-position objective), a
left-padding collator and a distributed-aware sampler.

``NextItemExamples`` is a map-style dataset whose items are just sample indices; the collator builds a whole
batch at once with vectorised numpy (no per-sample Python), so a DataLoader over millions of prefixes stays
cheap::

    examples = NextItemExamples(ds, "train")
    sampler = ShardedSampler(len(examples), seed=0)            # rank/world from torch.distributed
    loader = DataLoader(examples, batch_size=64, sampler=sampler, collate_fn=examples.collate)
    for epoch in range(n):
        sampler.set_epoch(epoch)
        for batch in loader: ...                               # input_ids [B, L] left-padded, ...
"""
from __future__ import annotations

from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hellm_ds.data.dataset import Dataset


def left_pad(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, max_len: int | None = None) -> np.ndarray:
    """Rows ``items[starts[b]:ends[b]]`` (keeping the last ``max_len``) right-aligned in a zero-padded
    int64 ``[B, L]`` array, L = the longest kept row."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    if max_len is not None:
        starts = np.maximum(starts, ends - max_len)
    lens = ends - starts
    B, L = lens.size, int(lens.max(initial=0))
    out = np.zeros((B, max(L, 1)), dtype=np.int64)
    if B:
        rows = np.repeat(np.arange(B), lens)
        within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        out[rows, L - np.repeat(lens, lens) + within] = items[np.repeat(starts, lens) + within]
    return out


class _IndexedSamples(torch.utils.data.Dataset):
    """A map-style dataset of sample indices over ``self.users`` (one row per sample); ``collate`` builds
    the batch."""

    users: np.ndarray

    def __len__(self) -> int:
        return int(self.users.size)

    def __getitem__(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return int(i) % len(self)


class NextItemExamples(_IndexedSamples):
    """Samples of one split: ``train`` (every prefix → next item) or ``valid``/``test`` (one per user).

    ``examples[i]`` returns ``i``; ``examples.collate(indices)`` returns the batch dict:
    ``input_ids`` [B, L] int64 left-padded with 0, ``attention_mask`` [B, L] int64, ``targets`` [B] int64,
    ``users`` [B] int64 (internal index), ``lengths`` [B] int64.
    """

    def __init__(self, dataset: Dataset, split: Literal["train", "valid", "test"], max_len: int | None = None):
        self.dataset = dataset
        self.split = split
        self.max_len = max_len or dataset.max_len
        if split == "train":
            s = dataset.train_samples
            self.users, self.starts, self.ends = s.users, s.hist_start, s.target_pos
            self.targets = dataset.items[s.target_pos]
        else:
            s = dataset.split(split)
            self.users, self.starts, self.ends, self.targets = s.users, s.hist_start, s.hist_end, s.targets

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        ids = left_pad(self.dataset.items, self.starts[idx], self.ends[idx], self.max_len)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy((ids != 0).astype(np.int64)),
            "targets": torch.from_numpy(self.targets[idx].astype(np.int64)),
            "users": torch.from_numpy(self.users[idx].astype(np.int64)),
            "lengths": torch.from_numpy(np.minimum(self.ends[idx] - self.starts[idx], self.max_len)),
        }


class SequenceExamples(_IndexedSamples):
    """Training sequences for the per-position objective: one sample per user with ≥ 2 training items, the
    training part t = ``items[start:train_end]`` (its last ``max_len + 1`` items) split into inputs t[:-1] and
    next items t[1:], as SASRec trains. One forward then predicts every training target of the user.

    ``collate(indices)``: ``input_ids`` [B, n] left-padded with 0, ``attention_mask``, ``next_items`` [B, n]
    (the item after each input; 0 at padding), ``targets`` [B] (the last next item), ``users``, ``lengths``.
    """

    split = "train"

    def __init__(self, dataset: Dataset, max_len: int | None = None):
        self.dataset = dataset
        self.max_len = max_len or dataset.max_len
        start, end = dataset.offsets[:-1], dataset.train_end
        self.users = np.flatnonzero(end - start >= 2).astype(np.int64)
        self.starts = np.maximum(start[self.users], end[self.users] - self.max_len - 1)
        self.ends = end[self.users]
        self.n_targets = int((self.ends - self.starts - 1).sum())

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        full = left_pad(self.dataset.items, self.starts[idx], self.ends[idx])  # [B, n + 1]
        ids, nxt = full[:, :-1], full[:, 1:].copy()
        nxt[ids == 0] = 0  # a row's first item is an input of nothing before it
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(ids)),
            "attention_mask": torch.from_numpy((ids != 0).astype(np.int64)),
            "next_items": torch.from_numpy(nxt),
            "targets": torch.from_numpy(full[:, -1].copy()),
            "users": torch.from_numpy(self.users[idx]),
            "lengths": torch.from_numpy(self.ends[idx] - self.starts[idx] - 1),
        }


def training_examples(dataset: Dataset, objective: str, max_len: int | None = None):
    """The training samples of an objective: ``all`` → ``SequenceExamples`` (one per user, every position
    predicts), ``last`` → ``NextItemExamples(dataset, "train")`` (one per prefix)."""
    if objective == "all":
        return SequenceExamples(dataset, max_len)
    if objective == "last":
        return NextItemExamples(dataset, "train", max_len)
    raise ValueError(f"objective must be 'all' or 'last', got {objective!r}")


def dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedSampler(torch.utils.data.Sampler[int]):
    """Each rank gets a disjoint shard of a (shuffled) permutation; the permutation depends only on
    ``seed`` and the epoch, so every rank agrees on it and a resumed run replays it.

    ``drop_last=True`` (training) trims the permutation to a multiple of ``world_size`` so every rank takes
    the same number of steps (collectives never wait on a missing rank); the trimmed samples differ from
    epoch to epoch. ``drop_last=False`` (evaluation) keeps every sample: shard sizes then differ by ≤ 1.
    """

    def __init__(
        self,
        num_samples: int,
        world_size: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        r, w = dist_rank_world()
        self.world_size = w if world_size is None else world_size
        self.rank = r if rank is None else rank
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of size {self.world_size}")
        self.n = num_samples
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            perm = np.arange(self.n)
        if self.drop_last:
            perm = perm[: self.n - self.n % self.world_size]
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.world_size
        return (self.n - self.rank + self.world_size - 1) // self.world_size
