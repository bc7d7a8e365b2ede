"""The dataset object every stage shares: id maps, truncated histories, the leave-one-out split, modalities.

Format of a dataset directory (see ``docs`` in the README)::

    DIR/sequences.txt         one user per line: ``user item item ...``, 1-based ids, chronological
    DIR/item2attributes.json  optional {"item_id": [attribute_id, ...]} → the "attributes" modality (multi-hot)
    DIR/features/<name>.npy   optional float [n_items, d]; row i-1 is item i; one file per modality
    DIR/items.tsv             optional ``item_id<TAB>text``
    DIR/catalogue.json        optional ``{"n_items": N}``: the catalogue size, when it holds items no sequence
                              mentions yet (written by ``hellm-ds import`` from an item table)

Ids: items keep their ids (1..n_items, ``n_items`` = the largest id in ``sequences.txt``, or N from
``catalogue.json`` — which may not be smaller; 0 is padding, and items that nobody bought are still part of
the catalogue and ranked, their features in the item hypergraph; ids must be dense: a largest id above
2 × the number of distinct item ids + 1000 is refused before anything is sized by it, unless catalogue.json
declares it — sparse raw ids go through ``hellm-ds import``, which renumbers them). Users get internal
indices 0..U-1 in file order; ``user_ids[u]`` is the external id.

Split (METHOD §0): each sequence is truncated to its last ``max_len`` items. A user with ≥3 items trains on
every prefix of ``items[:-2]`` predicting its next item, validates on ``items[:-2] → items[-2]`` and tests on
``items[:-1] → items[-1]``; a user with fewer items contributes training prefixes only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Mapping

import numpy as np

from hellm_ds.data.readers import (MultiHot, catalogue_size, check_dataset_dir, read_attributes, read_feature,
                                   read_item_texts, read_sequences)
from hellm_ds.errors import DataFormatError, UsageError

SplitName = Literal["valid", "test"]


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class Modality:
    """Item features of one modality: a dense float32 matrix, or a sparse multi-hot one (attributes)."""

    name: str
    dim: int
    dense: np.ndarray | None = None  # float32 [n_items, dim]
    multi_hot: MultiHot | None = None

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Feature rows of items lo+1..hi (0-based rows lo..hi-1) as float32."""
        if self.dense is not None:
            return self.dense[lo:hi]
        return self.multi_hot.dense_rows(lo, hi)


@dataclass(frozen=True)
class EvalSplit:
    """One leave-one-out evaluation split: user u's input history is ``items[hist_start[i]:hist_end[i]]``."""

    users: np.ndarray  # int64 [N] internal user index
    targets: np.ndarray  # int64 [N] item id
    hist_start: np.ndarray  # int64 [N] into Dataset.items
    hist_end: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return int(self.users.size)


@dataclass(frozen=True)
class TrainSamples:
    """Every training prefix → next item: history ``items[hist_start[i]:target_pos[i]]``, target ``items[target_pos[i]]``."""

    users: np.ndarray  # int64 [N]
    hist_start: np.ndarray  # int64 [N]
    target_pos: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return int(self.users.size)


@dataclass(frozen=True)
class Dataset:
    root: Path
    max_len: int
    user_ids: np.ndarray  # int64 [U] external ids
    n_items: int
    offsets: np.ndarray  # int64 [U+1] into items (truncated sequences)
    items: np.ndarray  # int64 [nnz]
    n_interactions: int  # before truncation
    modalities: Mapping[str, Modality] = field(default_factory=dict)
    item_texts: tuple[str, ...] | None = None  # indexed by item id
    items_without_interactions: int = 0  # catalogue items no (untruncated) sequence mentions

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return int(self.user_ids.size)

    @cached_property
    def lengths(self) -> np.ndarray:
        return _frozen(np.diff(self.offsets))

    @cached_property
    def train_end(self) -> np.ndarray:
        """Exclusive end (index into ``items``) of each user's training part."""
        n = self.lengths
        return _frozen(self.offsets[1:] - np.where(n >= 3, 2, 0))

    def history(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def user_index(self, external_ids) -> np.ndarray:
        """External user ids → internal indices; raises KeyError naming the first unknown id."""
        ext = np.asarray(external_ids, dtype=np.int64)
        order = self._user_order
        pos = np.searchsorted(self.user_ids[order], ext)
        pos = np.minimum(pos, order.size - 1)
        found = self.user_ids[order][pos] == ext
        if not found.all():
            raise KeyError(f"unknown user id {int(ext[~found][0])}")
        return order[pos]

    @cached_property
    def _user_order(self) -> np.ndarray:
        return _frozen(np.argsort(self.user_ids, kind="stable"))

    # ---- splits ------------------------------------------------------------------------------------
    @cached_property
    def train_samples(self) -> TrainSamples:
        start = self.offsets[:-1]
        n_targets = np.maximum(self.train_end - start - 1, 0)
        users = np.repeat(np.arange(self.n_users, dtype=np.int64), n_targets)
        first = np.repeat(start + 1 - np.cumsum(n_targets) + n_targets, n_targets)
        target_pos = first + np.arange(users.size, dtype=np.int64)
        return TrainSamples(users=_frozen(users), hist_start=_frozen(start[users]), target_pos=_frozen(target_pos))

    def split(self, name: SplitName) -> EvalSplit:
        if name not in ("valid", "test"):
            raise UsageError(f"split must be 'valid' or 'test', got {name!r}")
        users = np.flatnonzero(self.lengths >= 3).astype(np.int64)
        end = self.offsets[users + 1] - (2 if name == "valid" else 1)
        return EvalSplit(
            users=_frozen(users),
            targets=_frozen(self.items[end].copy()),
            hist_start=_frozen(self.offsets[users].copy()),
            hist_end=_frozen(end),
        )

    @cached_property
    def _train_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(user index, position in ``items``) of every item in the training parts."""
        n_train = self.train_end - self.offsets[:-1]
        users = np.repeat(np.arange(self.n_users, dtype=np.int64), n_train)
        pos = np.repeat(self.offsets[:-1] - np.cumsum(n_train) + n_train, n_train) + np.arange(users.size)
        return _frozen(users), _frozen(pos)

    def train_interactions(self) -> tuple[np.ndarray, np.ndarray]:
        """Unique (user index, item id) pairs of the training parts — what the graph stage may see."""
        users, pos = self._train_positions
        key = np.unique(users * (self.n_items + 1) + self.items[pos])
        return key // (self.n_items + 1), key % (self.n_items + 1)

    def item_train_counts(self) -> np.ndarray:
        """How often each item occurs in the training parts (index = item id; entry 0 is 0)."""
        return np.bincount(self.items[self._train_positions[1]], minlength=self.n_items + 1)

    # ---- identity ----------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 over the files' bytes and ``max_len``: the key for caches and exported artefacts."""
        return self.fingerprint_at(self.max_len)

    def fingerprint_at(self, max_len: int) -> str:
        """The fingerprint this dataset's files have at ``max_len`` (stage-1 exports made with another
        ``max_len`` are checked with it); computed once per ``max_len``."""
        cache = self.__dict__.setdefault("_fingerprints", {})  # frozen dataclass: a per-instance memo
        if max_len not in cache:
            h = hashlib.sha256(f"max_len={max_len}\n".encode())
            for rel in _dataset_files(self.root):
                h.update(rel.encode() + b"\0")
                with (self.root / rel).open("rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
            cache[max_len] = h.hexdigest()
        return cache[max_len]

    def require_eval_users(self) -> None:
        """A UsageError (exit 2) when no user has the 3 items a leave-one-out evaluation needs."""
        if not (self.lengths >= 3).any():
            raise UsageError(f"nothing to evaluate: no user of {self.root}/sequences.txt has ≥ 3 items "
                             f"(leave-one-out needs a training item, a validation and a test item)")

    def stats(self) -> dict:
        return {
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "interactions_after_truncation": int(self.items.size),
            "train_samples": len(self.train_samples),
            "valid_users": len(self.split("valid")),
            "test_users": len(self.split("test")),
            "max_len": self.max_len,
            "items_without_interactions": self.items_without_interactions,
            "modalities": {name: m.dim for name, m in self.modalities.items()},
        }


def _dataset_files(root: Path) -> list[str]:
    files = ["sequences.txt"]
    files += [p for p in ("item2attributes.json", "items.tsv") if (root / p).is_file()]
    if (root / "catalogue.json").is_file():  # only when present: datasets without it keep their fingerprint
        files.append("catalogue.json")
    feat = root / "features"
    if feat.is_dir():
        files += [f"features/{p.name}" for p in sorted(feat.glob("*.npy"))]
    return files


def load_dataset(root: str | Path, max_len: int = 50) -> Dataset:
    """Read and validate a dataset directory; raises ``DataFormatError`` on the first problem."""
    if max_len < 3:
        raise UsageError(f"max_len must be ≥ 3 (leave-one-out needs 3 items), got {max_len}")
    root = check_dataset_dir(root)
    raw = read_sequences(root / "sequences.txt")
    n_items = catalogue_size(root, raw)  # catalogue.json or the largest id; sparse ids refused first
    seen = np.zeros(n_items + 1, dtype=bool)
    seen[raw.items] = True

    lengths = np.diff(raw.offsets)
    kept = np.minimum(lengths, max_len)
    offsets = np.zeros_like(raw.offsets)
    np.cumsum(kept, out=offsets[1:])
    src = np.repeat(raw.offsets[1:] - kept - offsets[:-1], kept) + np.arange(int(kept.sum()))
    items = raw.items[src]

    modalities: dict[str, Modality] = {}
    attr = root / "item2attributes.json"
    if attr.is_file():
        mh = read_attributes(attr, n_items)
        modalities["attributes"] = Modality("attributes", mh.dim, multi_hot=mh)
    feat_dir = root / "features"
    if feat_dir.is_dir():
        for p in sorted(feat_dir.glob("*.npy")):
            name = p.stem
            if name in modalities:
                raise DataFormatError(p, None, "modality name clashes with item2attributes.json", name)
            arr = _frozen(read_feature(p, n_items))
            modalities[name] = Modality(name, int(arr.shape[1]), dense=arr)
    texts = read_item_texts(root / "items.tsv", n_items) if (root / "items.tsv").is_file() else None

    return Dataset(
        root=root,
        max_len=max_len,
        user_ids=_frozen(raw.user_ids),
        n_items=n_items,
        offsets=_frozen(offsets),
        items=_frozen(items),
        n_interactions=int(raw.items.size),
        modalities=MappingProxyType(modalities),
        item_texts=texts,
        items_without_interactions=int(n_items - np.count_nonzero(seen)),
    )
