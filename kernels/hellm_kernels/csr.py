"""The sparse format the kernels compute on: a compressed-sparse-row matrix as plain tensors, with O(nnz)
construction and transposition.

    A[r, indices[j]] = values[j]  (1 when ``values`` is None)   for indptr[r] ≤ j < indptr[r + 1]

Indices are int32 while both the number of non-zeros and the dimensions fit (half the bytes the kernels
read), int64 beyond 2³¹. ``values`` is ``None`` for 0/1 incidence matrices: the kernels then read no
value array at all.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

INT32_LIMIT = 2**31 - 1


def sparse_csr_tensor(indptr, indices, values, shape) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` without its "beta state" warning on every construction."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(indptr, indices, values, shape)


def index_dtype(nnz: int, shape: tuple[int, int]) -> torch.dtype:
    return torch.int32 if max(nnz, *shape) <= INT32_LIMIT else torch.int64


@dataclass(frozen=True, eq=False)
class CSR:
    indptr: torch.Tensor  # [rows + 1]
    indices: torch.Tensor  # [nnz], column of each non-zero, sorted within a row
    shape: tuple[int, int]
    values: torch.Tensor | None = None  # [nnz] or None (all ones)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        """The kernels index these arrays as ``base + position``: each is made contiguous here, once (a view
        with another stride — a slice, a column of a table — is copied), so no kernel call has to check."""
        for name in ("indptr", "indices", "values"):
            t = getattr(self, name)
            if t is None:
                continue
            if t.dim() != 1:
                raise ValueError(f"CSR.{name} must be 1-D, got shape {list(t.shape)}")
            if not t.is_contiguous():
                object.__setattr__(self, name, t.contiguous())

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def row_nnz(self) -> torch.Tensor:
        return self.indptr[1:].long() - self.indptr[:-1].long()

    @staticmethod
    def from_coo(rows, cols, shape: tuple[int, int], values=None) -> "CSR":
        """Build from (row, col[, value]) arrays; duplicates are not allowed (checked)."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = np.asarray(cols, dtype=np.int64)
        order = np.lexsort((cols, rows))
        rows, cols = rows[order], cols[order]
        if rows.size and ((rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1])).any():
            raise ValueError("duplicate (row, col) entries")
        counts = np.bincount(rows, minlength=shape[0])
        indptr = np.zeros(shape[0] + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        dt = index_dtype(rows.size, shape)
        vals = None if values is None else torch.as_tensor(np.asarray(values)[order])
        return CSR(torch.from_numpy(indptr).to(dt), torch.from_numpy(cols).to(dt), tuple(shape), vals)

    def transpose(self) -> "CSR":
        """CSR of the transpose (equivalently, CSC of this matrix), by a stable sort of the column indices,
        on the matrix's own device (the GPU sorts 10⁸ non-zeros in well under a second)."""
        order = torch.sort(self.indices, stable=True).indices  # rows stay sorted within each column
        shape = (self.shape[1], self.shape[0])
        dt = index_dtype(self.nnz, shape)
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=self.device, dtype=dt), self.row_nnz())
        t_indptr = torch.zeros(self.shape[1] + 1, dtype=torch.int64, device=self.device)
        torch.cumsum(torch.bincount(self.indices, minlength=self.shape[1]), 0, out=t_indptr[1:])
        vals = None if self.values is None else self.values[order]
        return CSR(t_indptr.to(dt), rows[order], shape, vals)

    def to(self, device) -> "CSR":
        device = torch.device(device)
        if device == self.device:
            return self
        v = None if self.values is None else self.values.to(device)
        return CSR(self.indptr.to(device), self.indices.to(device), self.shape, v)

    def to_dense(self, dtype=torch.float64) -> torch.Tensor:
        """Dense copy — for tests and tiny graphs only."""
        out = torch.zeros(self.shape, dtype=dtype)
        rows = torch.repeat_interleave(torch.arange(self.shape[0]), self.row_nnz().cpu())
        v = torch.ones(self.nnz, dtype=dtype) if self.values is None else self.values.cpu().to(dtype)
        out[rows, self.indices.cpu().long()] = v
        return out

    def torch_sparse_csr(self, dtype: torch.dtype) -> torch.Tensor:
        """``torch.sparse_csr_tensor`` view (cuSPARSE / MKL backend), built once per dtype and cached."""
        key = ("torch_csr", dtype)
        if key not in self._cache:
            v = torch.ones(self.nnz, dtype=dtype, device=self.device) if self.values is None else self.values.to(dtype)
            self._cache[key] = sparse_csr_tensor(self.indptr, self.indices, v, self.shape)
        return self._cache[key]
