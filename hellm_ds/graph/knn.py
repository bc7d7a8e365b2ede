"""Per-modality top-k cosine neighbourhoods → the binary incidence A_m of METHOD §1, in row blocks.

A_m[i, j] = 1 iff j is among item i's k most cosine-similar items, i itself always included. Memory is
O(block · n_items) (one block of similarities at a time), never O(n_items²); the search runs on the GPU
when one is given. An item whose feature vector is zero (no features) gets only itself, and is never a
neighbour of another item.
"""
from __future__ import annotations

import numpy as np
import torch

from hellm_ds.data.dataset import Modality
from hellm_ds.utils.device import resolve_device
from hellm_kernels.csr import CSR, sparse_csr_tensor


def _normalised_keys(mod: Modality, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, zero_mask): L2-normalised item vectors (dense, or sparse CSR for multi-hot) and which are 0."""
    if mod.dense is not None:
        x = torch.tensor(mod.dense, dtype=torch.float32, device=device)  # a copy: the array is read-only
        norm = x.norm(dim=1)
        zero = norm == 0
        return x / torch.where(zero, 1.0, norm)[:, None], zero
    mh = mod.multi_hot
    counts = torch.from_numpy(np.diff(mh.indptr)).to(device)
    zero = counts == 0
    vals = torch.repeat_interleave(counts.float().clamp_min(1).rsqrt(), counts)
    keys = sparse_csr_tensor(
        torch.from_numpy(mh.indptr).to(device), torch.from_numpy(mh.indices).to(device), vals,
        (int(counts.numel()), mh.dim),
    )
    return keys, zero


def knn_incidence(mod: Modality, k: int, block: int = 2048, device: str | torch.device | None = None) -> CSR:
    """The I × I binary top-k matrix A_m of one modality (CSR on the CPU, columns sorted per row)."""
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    device = resolve_device(device)
    keys, zero = _normalised_keys(mod, device)
    n = int(zero.numel())
    kk = min(k, n)
    rows_out, cols_out = [], []
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        if keys.layout == torch.sparse_csr:
            q = torch.from_numpy(mod.multi_hot.dense_rows(lo, hi)).to(device)
            q = q * q.sum(1, keepdim=True).clamp_min(1).rsqrt()
            sims = (keys @ q.T).T  # [B, n] without densifying the key matrix
        else:
            sims = keys[lo:hi] @ keys.T
        sims[:, zero] = -torch.inf  # an item without features is nobody's neighbour
        ar = torch.arange(hi - lo, device=device)
        sims[ar, lo + ar] = torch.inf  # itself, always
        val, idx = sims.topk(kk, dim=1)
        keep = val > -torch.inf
        keep &= ~zero[lo:hi, None] | (idx == (lo + ar)[:, None])  # featureless rows keep only themselves
        r, c = keep.nonzero(as_tuple=True)
        rows_out.append((r + lo).cpu())
        cols_out.append(idx[r, c].cpu())
    rows = torch.cat(rows_out).numpy()
    cols = torch.cat(cols_out).numpy()
    return CSR.from_coo(rows, cols, (n, n))


def hyperedges(incidences: list[CSR]) -> CSR:
    """H = [A_1 | … | A_M] ∈ {0,1}^{I × M·I}: column m·I + j is the hyperedge of modality m around item j."""
    if not incidences:
        raise ValueError("no modality to build item hyperedges from")
    n = incidences[0].shape[0]
    rows, cols = [], []
    for m, A in enumerate(incidences):
        rows.append(torch.repeat_interleave(torch.arange(n), A.row_nnz().cpu()))
        cols.append(A.indices.cpu().long() + m * n)
    return CSR.from_coo(torch.cat(rows).numpy(), torch.cat(cols).numpy(), (n, n * len(incidences)))
