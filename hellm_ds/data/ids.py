"""Raw interaction chunks → a dataset directory: id encoding, filters, k-core, chronological sequences.

Columnar throughout (numpy unique/lexsort/bincount; no Python object per interaction beyond the parsed
strings of one chunk):

1. Each chunk's raw user and item ids are reduced to codes into the chunk's own sorted unique ids; at the end
   the chunks' unique ids are merged into one vocabulary and the codes remapped (memory: int32/int64 codes,
   the timestamps and ratings, and the distinct raw ids).
2. Filters, in this order, each counted in the summary: ``min_rating`` (keep rating ≥ X; rows without a
   rating are dropped when a threshold is set), ``dedup`` (keep the earliest interaction of each (user, item)
   pair), ``k_core`` (iteratively drop users and items with fewer than K interactions until none is left —
   ``--k-core 5`` is the rule of the Amazon "5-core" sets).
3. Dense 1-based ids over what is left, deterministically: raw ids sorted numerically when every raw id of
   the column is a plain integer (ties — ``7`` and ``007`` — by text), otherwise by their UTF-8 text. Users'
   sequences are chronological; equal timestamps keep the input order.
4. The directory is written in a temporary sibling and renamed into place (``--out`` must be absent or
   empty unless ``overwrite``): ``sequences.txt``, ``user_ids.tsv`` and ``item_ids.tsv`` (``id<TAB>raw id``),
   ``items.tsv`` (titles), ``item2attributes.json`` with ``attribute_ids.tsv``, and ``import.json`` (the
   summary).
5. ``keep_unseen`` (``--keep-unseen-items``): items the item table (RecBole ``.item``, Amazon metadata) lists
   but no input interaction mentions — new items — join the catalogue after the interacted ones (ids
   ``I+1..N``, ordered like the others), with their titles and attributes, and ``catalogue.json``
   (``{"n_items": N}``) declares the size. Items the filters dropped stay out.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from hellm_ds.data.importers import Chunk, ItemMeta
from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.utils.io import new_directory


@dataclass
class Log:
    users: np.ndarray  # int [n] codes into user_vocab
    items: np.ndarray  # int [n] codes into item_vocab
    timestamps: np.ndarray  # float64 [n]
    ratings: np.ndarray | None
    user_vocab: np.ndarray  # str [U0] sorted raw ids
    item_vocab: np.ndarray  # str [I0]


def _merge_codes(uniqs: list[np.ndarray], codes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    vocab = np.unique(np.concatenate(uniqs)) if uniqs else np.zeros(0, dtype=str)
    dtype = np.int32 if vocab.size < 2**31 else np.int64
    out = np.empty(sum(c.size for c in codes), dtype=dtype)
    pos = 0
    for u, c in zip(uniqs, codes):
        out[pos : pos + c.size] = np.searchsorted(vocab, u).astype(dtype)[c]
        pos += c.size
    return vocab, out


def collect(chunks: Iterable[Chunk]) -> Log:
    """Concatenate parsed chunks, keeping only codes (not strings) per interaction."""
    u_uniq, u_codes, i_uniq, i_codes, times, ratings = [], [], [], [], [], []
    has_rating = None
    for ch in chunks:
        for uniqs, codes, col in ((u_uniq, u_codes, ch.users), (i_uniq, i_codes, ch.items)):
            uq, inv = np.unique(col, return_inverse=True)
            uniqs.append(uq)
            codes.append(inv.astype(np.int32).ravel())
        times.append(ch.timestamps)
        has_rating = ch.ratings is not None if has_rating is None else has_rating
        if has_rating:
            ratings.append(ch.ratings)
        del ch
    if not times:
        raise UsageError("the input holds no interactions")
    user_vocab, users = _merge_codes(u_uniq, u_codes)
    del u_uniq, u_codes
    item_vocab, items = _merge_codes(i_uniq, i_codes)
    del i_uniq, i_codes
    return Log(users=users, items=items, timestamps=np.concatenate(times),
               ratings=np.concatenate(ratings) if has_rating else None, user_vocab=user_vocab, item_vocab=item_vocab)


def k_core(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the interactions in the k-core: every user and every item kept has ≥ k of them."""
    keep = np.ones(users.size, dtype=bool)
    if k <= 1:
        return keep
    nu, ni = int(users.max(initial=-1)) + 1, int(items.max(initial=-1)) + 1
    while True:
        cu = np.bincount(users[keep], minlength=nu)
        ci = np.bincount(items[keep], minlength=ni)
        ok = keep & (cu[users] >= k) & (ci[items] >= k)
        if np.array_equal(ok, keep):
            return keep
        keep = ok


def _dense_order(vocab: np.ndarray) -> np.ndarray:
    """Positions of ``vocab`` (sorted text) in id order: numeric when all are plain integers."""
    if vocab.size and (np.char.isdigit(vocab) & (np.char.str_len(vocab) <= 18)).all():
        return np.lexsort((np.arange(vocab.size), vocab.astype(np.int64)))  # ties ("7", "007"): by text
    return np.arange(vocab.size)


def build(log: Log, min_rating: float | None = None, dedup: bool = False, k: int = 0):
    """Filters and dense ids → (user raw ids [U], item raw ids [I], offsets [U+1], items [nnz] 1-based,
    summary dict)."""
    n0 = int(log.users.size)
    summary = {"input_interactions": n0, "input_users": int(log.user_vocab.size),
               "input_items": int(log.item_vocab.size), "dropped": {}}
    keep = np.ones(n0, dtype=bool)
    if min_rating is not None:
        if log.ratings is None:
            raise UsageError("--min-rating needs a rating column (--columns user,item,timestamp,rating)")
        keep &= log.ratings >= min_rating  # NaN (no rating) compares False
        summary["dropped"]["min_rating"] = n0 - int(keep.sum())
    # chronological per user, stable in input order
    order = np.flatnonzero(keep)
    order = order[np.lexsort((log.timestamps[order], log.users[order]))]
    u, i = log.users[order], log.items[order]
    if dedup:
        key = u.astype(np.int64) * max(int(log.item_vocab.size), 1) + i
        _, first = np.unique(key, return_index=True)
        mask = np.zeros(order.size, dtype=bool)
        mask[first] = True
        summary["dropped"]["duplicates"] = int(order.size - first.size)
        order, u, i = order[mask], u[mask], i[mask]
    if k and k > 1:
        mask = k_core(u, i, k)
        summary["dropped"]["k_core"] = int(order.size - mask.sum())
        order, u, i = order[mask], u[mask], i[mask]
    if order.size == 0:
        raise UsageError(f"no interaction is left after the filters (dropped: {summary['dropped']})")

    def dense(codes: np.ndarray, vocab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        present = np.zeros(vocab.size, dtype=bool)
        present[codes] = True
        pos = _dense_order(vocab)
        pos = pos[present[pos]]  # kept raw ids in id order
        new = np.zeros(vocab.size, dtype=np.int64)
        new[pos] = np.arange(1, pos.size + 1)
        return new[codes], vocab[pos]

    uid, user_raw = dense(u, log.user_vocab)
    iid, item_raw = dense(i, log.item_vocab)
    # rows are grouped by old user code; re-group by new id (stable: keeps the chronological order)
    regroup = np.argsort(uid, kind="stable")
    uid, iid = uid[regroup], iid[regroup]
    counts = np.bincount(uid, minlength=user_raw.size + 1)[1:]
    offsets = np.zeros(user_raw.size + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    summary.update(users=int(user_raw.size), items=int(item_raw.size), interactions=int(iid.size))
    return user_raw, item_raw, offsets, iid, summary


def _write_sequences(path: Path, offsets: np.ndarray, items: np.ndarray) -> None:
    step = 1 << 16
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for lo in range(0, offsets.size - 1, step):
            hi = min(offsets.size - 1, lo + step)
            seg = items[offsets[lo] : offsets[hi]].tolist()
            base = int(offsets[lo])
            f.write("".join(
                f"{u + 1} " + " ".join(map(str, seg[offsets[u] - base : offsets[u + 1] - base])) + "\n"
                for u in range(lo, hi)))


def _write_ids(path: Path, raw: np.ndarray) -> None:
    for j, r in enumerate(raw.tolist()):
        if "\t" in r or "\n" in r or "\r" in r:
            raise DataFormatError(path.name, None, "raw id holds a tab or newline", r)
    path.write_text("".join(f"{j}\t{r}\n" for j, r in enumerate(raw.tolist(), 1)), encoding="utf-8")


def write_dataset(out: str | Path, user_raw, item_raw, offsets, items, summary: dict,
                  meta: ItemMeta | None = None, overwrite: bool = False, catalogue: int | None = None) -> Path:
    out = Path(out)
    with new_directory(out, overwrite) as tmp:
        _write_sequences(tmp / "sequences.txt", offsets, items)
        _write_ids(tmp / "user_ids.tsv", user_raw)
        _write_ids(tmp / "item_ids.tsv", item_raw)
        if meta is not None:
            raw = item_raw.tolist()
            titles = [(j, meta.titles[r]) for j, r in enumerate(raw, 1) if r in meta.titles]
            if titles:
                (tmp / "items.tsv").write_text(
                    "".join(f"{j}\t{' '.join(t.split())}\n" for j, t in titles), encoding="utf-8")
            attrs = [(j, meta.attributes[r]) for j, r in enumerate(raw, 1) if r in meta.attributes]
            if attrs:
                vocab = sorted({a for _, names in attrs for a in names})
                aid = {a: n for n, a in enumerate(vocab, 1)}
                (tmp / "item2attributes.json").write_text(
                    json.dumps({str(j): sorted({aid[a] for a in names}) for j, names in attrs}), encoding="utf-8")
                (tmp / "attribute_ids.tsv").write_text(
                    "".join(f"{n}\t{' '.join(a.split())}\n" for n, a in enumerate(vocab, 1)), encoding="utf-8")
            summary["titles"] = len(titles)
            summary["items_with_attributes"] = len(attrs)
        if catalogue is not None:
            (tmp / "catalogue.json").write_text(json.dumps({"n_items": int(catalogue)}) + "\n", encoding="utf-8")
        (tmp / "import.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return out


def import_log(chunks: Iterable[Chunk], out: str | Path, meta_loader=None, min_rating: float | None = None,
               dedup: bool = False, k: int = 0, overwrite: bool = False, source: dict | None = None,
               keep_unseen: bool = False) -> dict:
    """The whole import; ``meta_loader(kept raw item ids: set, or None for all) -> ItemMeta`` reads side
    information for the items that survived the filters; with ``keep_unseen`` the item table's items no input
    interaction mentions join the catalogue (see the module doc). Returns the summary (also written to
    ``OUT/import.json``)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite)")
    if k < 0:
        raise UsageError(f"--k-core must be ≥ 0, got {k}")
    start = time.perf_counter()
    if keep_unseen and meta_loader is None:
        raise UsageError("--keep-unseen-items needs an item table (--item-file for recbole, --meta for amazon)")
    log = collect(chunks)
    user_raw, item_raw, offsets, items, summary = build(log, min_rating=min_rating, dedup=dedup, k=k)
    catalogue = None
    if keep_unseen:
        meta = meta_loader(None)
        listed = np.unique(np.array(meta.items, dtype=str)) if meta.items else np.zeros(0, dtype=str)
        unseen = listed[~np.isin(listed, log.item_vocab)]  # never in the input (filtered-out items stay out)
        unseen = unseen[_dense_order(unseen)]
        if unseen.size:
            item_raw = np.concatenate([item_raw, unseen])
            catalogue = int(item_raw.size)
        summary.update(items_without_interactions=int(unseen.size), catalogue_items=int(item_raw.size))
        del log
    else:
        del log
        meta = meta_loader(set(item_raw.tolist())) if meta_loader is not None else None
    summary = {"out": str(out), **(source or {}), **summary}
    write_dataset(out, user_raw, item_raw, offsets, items, summary, meta=meta, overwrite=overwrite,
                  catalogue=catalogue)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary
