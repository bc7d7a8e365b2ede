"""Build a dataset's graph structures once and cache them on disk (safetensors, keyed by a hash of the
dataset's bytes and the parameters).

    graphs = load_or_build(dataset, GraphConfig(knn_k=10), cache_dir="runs/graphs")
    graphs.ui()    # LightGCN Â            (BipartiteOperator)
    graphs.u2u()   # user hypergraph U2U   (TwoStageOperator)
    graphs.i2i()   # item hypergraph I2I   (TwoStageOperator)
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hellm_ds.data.dataset import Dataset
from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.graph.knn import hyperedges, knn_incidence
from hellm_ds.graph.operators import bipartite_operator, interaction_matrix, item_hypergraph, user_hypergraph
from hellm_ds.utils.io import atomic_write
from hellm_kernels.csr import CSR
from hellm_kernels.operators import BipartiteOperator, TwoStageOperator

FORMAT_VERSION = 1


@dataclass(frozen=True)
class GraphConfig:
    knn_k: int = 10
    modalities: tuple[str, ...] | None = None  # None → every modality of the dataset
    knn_block: int = 2048

    def __post_init__(self):
        if self.knn_k < 1:
            raise UsageError(f"--knn-k must be ≥ 1 (each item is its own first neighbour), got {self.knn_k}")
        if self.knn_block < 1:
            raise UsageError(f"knn_block must be ≥ 1, got {self.knn_block}")


@dataclass(frozen=True, eq=False)
class Graphs:
    R: CSR
    RT: CSR
    H: CSR | None  # None when the dataset has no item modality
    HT: CSR | None
    modalities: tuple[str, ...]
    meta: dict

    @cached_property
    def _ui(self) -> BipartiteOperator:
        return bipartite_operator(self.R, self.RT)

    def ui(self) -> BipartiteOperator:
        return self._ui

    @cached_property
    def _u2u(self) -> TwoStageOperator:
        return user_hypergraph(self.R, self.RT)

    def u2u(self) -> TwoStageOperator:
        return self._u2u

    @cached_property
    def _i2i(self) -> TwoStageOperator:
        if self.H is None:
            raise UsageError("the dataset has no item modality: no item hypergraph")
        return item_hypergraph(self.H, self.HT)

    def i2i(self) -> TwoStageOperator:
        return self._i2i

    # ---- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file, then rename): an interrupted write leaves no partial cache."""
        path = Path(path)
        tensors = {"R.indptr": self.R.indptr, "R.indices": self.R.indices,
                   "RT.indptr": self.RT.indptr, "RT.indices": self.RT.indices}
        if self.H is not None:
            tensors.update({"H.indptr": self.H.indptr, "H.indices": self.H.indices,
                            "HT.indptr": self.HT.indptr, "HT.indices": self.HT.indices})
        meta = {"format": str(FORMAT_VERSION), "meta": json.dumps(self.meta, sort_keys=True),
                "modalities": json.dumps(list(self.modalities)),
                "R.shape": json.dumps(self.R.shape), "H.shape": json.dumps(None if self.H is None else self.H.shape)}
        return atomic_write(path, lambda tmp: save_file({k: v.contiguous().cpu() for k, v in tensors.items()},
                                                        tmp, metadata=meta))

    @staticmethod
    def load(path: str | Path) -> "Graphs":
        path = Path(path)
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            t = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DataFormatError(path, None, f"unreadable graph cache ({e})") from None
        if meta.get("format") != str(FORMAT_VERSION):
            raise DataFormatError(path, None, "graph cache of another format version", meta.get("format"))
        try:
            r_shape = tuple(json.loads(meta["R.shape"]))
            h_shape = json.loads(meta["H.shape"])
            R = CSR(t["R.indptr"], t["R.indices"], r_shape)
            RT = CSR(t["RT.indptr"], t["RT.indices"], r_shape[::-1])
            H = HT = None
            if h_shape is not None:
                H = CSR(t["H.indptr"], t["H.indices"], tuple(h_shape))
                HT = CSR(t["HT.indptr"], t["HT.indices"], tuple(h_shape)[::-1])
            graphs = Graphs(R, RT, H, HT, tuple(json.loads(meta["modalities"])), json.loads(meta["meta"]))
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise DataFormatError(path, None, f"graph cache is missing or has a malformed entry ({e})") from None
        for name, m in (("R", R), ("RT", RT), ("H", H), ("HT", HT)):
            if m is not None:
                _check_csr(path, name, m)
        return graphs

    # ---- sizes -------------------------------------------------------------------------------------
    def sizes(self, exact_products: bool = True) -> dict:
        """nnz of R and H, the two-stage cost per application, and what R Rᵀ / H Hᵀ would cost."""
        out = {"users": self.R.shape[0], "items": self.R.shape[1], "nnz_R": self.R.nnz,
               "two_stage_nnz_u2u": 2 * self.R.nnz,
               "rrt_multiply_adds": int((self.RT.row_nnz().double() ** 2).sum().item())}
        if exact_products:
            out["rrt_nnz"] = product_nnz(self.R, self.RT)
            out["rrt_over_two_stage"] = round(out["rrt_nnz"] / max(out["two_stage_nnz_u2u"], 1), 2)
        if self.H is not None:
            out.update({"modalities": list(self.modalities), "nnz_H": self.H.nnz,
                        "two_stage_nnz_i2i": 2 * self.H.nnz})
            if exact_products:
                out["hht_nnz"] = product_nnz(self.H, self.HT)
        return out


def _check_csr(path: Path, name: str, m: CSR) -> None:
    """Refuse a tampered cache before a kernel reads out of bounds."""
    ip = m.indptr.long()
    ok = (ip.numel() == m.shape[0] + 1 and ip[0] == 0 and ip[-1] == m.indices.numel()
          and bool((ip[1:] >= ip[:-1]).all()))
    if ok and m.nnz:
        ok = int(m.indices.min()) >= 0 and int(m.indices.max()) < m.shape[1]
    if not ok:
        raise DataFormatError(path, None, f"graph cache entry {name} is not a valid CSR matrix")


def product_nnz(A: CSR, AT: CSR, budget: int = 1 << 24) -> int:
    """nnz(A Aᵀ), counted over row blocks whose two-hop lists hold ≈ ``budget`` entries (never the product)."""
    n = A.shape[0]
    indptr, indices = A.indptr.long().numpy(), A.indices.long().numpy()
    t_indptr, t_indices = AT.indptr.long().numpy(), AT.indices.long().numpy()
    col_len = np.diff(t_indptr)
    hop_cost = np.zeros(n + 1, dtype=np.int64)  # cumulative two-hop entries up to each row
    row_of = np.repeat(np.arange(n), np.diff(indptr))
    np.cumsum(np.bincount(row_of, weights=col_len[indices], minlength=n).astype(np.int64), out=hop_cost[1:])
    total, lo = 0, 0
    while lo < n:
        hi = max(lo + 1, int(np.searchsorted(hop_cost, hop_cost[lo] + budget, side="right")) - 1)
        hi = min(hi, n)
        cols = indices[indptr[lo] : indptr[hi]]
        rows = np.repeat(np.arange(lo, hi), np.diff(indptr[lo : hi + 1]))
        lens = col_len[cols]
        idx = np.repeat(t_indptr[cols] - np.cumsum(lens) + lens, lens) + np.arange(int(lens.sum()))
        total += int(np.unique(np.repeat(rows, lens) * n + t_indices[idx]).size)
        lo = hi
    return total


def build_graphs(dataset: Dataset, cfg: GraphConfig = GraphConfig(), device=None) -> Graphs:
    users, items = dataset.train_interactions()
    R = interaction_matrix(users, items, dataset.n_users, dataset.n_items)
    RT = R.transpose()
    names = tuple(cfg.modalities) if cfg.modalities is not None else tuple(dataset.modalities)
    missing = [m for m in names if m not in dataset.modalities]
    if missing:
        raise UsageError(f"unknown modality {missing[0]!r}; the dataset has {sorted(dataset.modalities)}")
    H = HT = None
    if names and cfg.knn_k > dataset.n_items:  # knn_incidence takes min(k, items): say so, once
        print(f"hellm-ds: note: --knn-k {cfg.knn_k} is more than the {dataset.n_items} items: k = "
              f"{dataset.n_items} is used", file=sys.stderr, flush=True)
    if names:
        H = hyperedges([knn_incidence(dataset.modalities[m], cfg.knn_k, cfg.knn_block, device) for m in names])
        HT = H.transpose()
    meta = {"dataset": dataset.fingerprint, "config": asdict(cfg), "format": FORMAT_VERSION}
    return Graphs(R, RT, H, HT, names, meta)


def cache_key(dataset: Dataset, cfg: GraphConfig) -> str:
    blob = json.dumps({"dataset": dataset.fingerprint, "config": asdict(cfg), "format": FORMAT_VERSION},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_or_build(dataset: Dataset, cfg: GraphConfig = GraphConfig(), cache_dir: str | Path | None = None,
                  device=None) -> Graphs:
    """Load ``cache_dir/graphs-<key>.safetensors`` when present, else build and write it."""
    if cache_dir is None:
        return build_graphs(dataset, cfg, device)
    path = Path(cache_dir) / f"graphs-{cache_key(dataset, cfg)}.safetensors"
    if path.is_file():
        return Graphs.load(path)
    graphs = build_graphs(dataset, cfg, device)
    graphs.save(path)
    return graphs
