"""One SpMM with a fused epilogue, three backends (no autograd here; see ``kernels.autograd``):

    out = rs ⊙ (A · (cs ⊙ X)) − c ⊙ Z ;   layer_sum += out        (rs, cs, c, Z, layer_sum optional)

Backends:
- ``triton``: ``kernels.spmm_triton`` — CUDA tensors (CPU tensors too under ``TRITON_INTERPRET=1``, for tests);
  ``triton_tile`` is its tile variant (same results; see that module — the GPU benchmark compares the two);
- ``torch``: ``torch.sparse`` CSR ``@`` (cuSPARSE on GPU, MKL on CPU) plus elementwise ops — the reference;
- ``torch_sparse``: ``torch_sparse.matmul`` when the optional package is installed.
``auto`` picks Triton for CUDA tensors and ``torch`` otherwise.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from hellm_kernels.csr import CSR, sparse_csr_tensor

BACKENDS = ("auto", "triton", "triton_tile", "torch", "torch_sparse")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def torch_sparse_available() -> bool:
    """Importable, not merely installed: torch_sparse also needs torch_scatter built against this torch."""
    try:
        import torch_sparse  # noqa: F401
    except Exception:  # ImportError, or an ABI mismatch surfacing as OSError/RuntimeError
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, X: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown SpMM backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        return "triton" if X.is_cuda and triton_available() else "torch"
    if backend in ("triton", "triton_tile"):
        if not triton_available():
            raise RuntimeError(f"backend {backend!r} requested but triton is not installed")
        if not X.is_cuda and not triton_interpreted():
            raise RuntimeError(f"backend {backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                               "tests)")
    if backend == "torch_sparse" and not torch_sparse_available():
        raise RuntimeError("backend 'torch_sparse' requested but torch_sparse cannot be imported (pip install "
                           "torch-scatter torch-sparse --no-build-isolation, against the installed torch)")
    return backend


def _epilogue_torch(Y, row_scale, diag, Z, layer_sum, out):
    if row_scale is not None:
        Y = Y * row_scale.to(Y.dtype)[:, None]
    if diag is not None:
        Y = Y - diag.to(Y.dtype)[:, None] * Z.to(Y.dtype)
    if out is not None:
        out.copy_(Y)
        Y = out
    if layer_sum is not None:
        layer_sum.add_(Y.to(layer_sum.dtype))
    return Y


def _compute_dtype(X: torch.Tensor) -> torch.dtype:
    # cuSPARSE multiplies bf16/fp16 with fp32 accumulation; MKL (CPU) has no half-precision CSR SpMM
    return X.dtype if X.dtype in (torch.float32, torch.float64) or X.is_cuda else torch.float32


def _scaled_input(X, col_scale):
    dt = _compute_dtype(X)
    Xc = X.to(dt)
    return Xc * col_scale.to(dt)[:, None] if col_scale is not None else Xc


def _folded_csr(A: CSR, dtype: torch.dtype, row_scale, col_scale) -> torch.Tensor:
    """torch CSR of diag(rs) · A · diag(cs), cached on A per (dtype, rs, cs): one library SpMM instead of a
    product plus two passes over the dense operands. The scale vectors of an operator live as long as it."""
    if row_scale is None and col_scale is None:
        return A.torch_sparse_csr(dtype)
    key = ("torch_csr_folded", dtype, id(row_scale), id(col_scale))
    hit = A._cache.get(key)
    if hit is not None and hit[0] is row_scale and hit[1] is col_scale:
        return hit[2]
    v = torch.ones(A.nnz, dtype=dtype, device=A.device) if A.values is None else A.values.to(dtype)
    if row_scale is not None:
        v = v * torch.repeat_interleave(row_scale.to(dtype), A.row_nnz())
    if col_scale is not None:
        v = v * col_scale.to(dtype)[A.indices.long()]
    T = sparse_csr_tensor(A.indptr, A.indices, v, A.shape)
    A._cache[key] = (row_scale, col_scale, T)
    return T


def spmm_torch(A: CSR, X, row_scale=None, col_scale=None, diag=None, Z=None, layer_sum=None, out=None):
    dt = _compute_dtype(X)
    Y = _folded_csr(A, dt, row_scale, col_scale) @ X.to(dt)
    return _epilogue_torch(Y, None, diag, Z, layer_sum, out).to(X.dtype)


def spmm_torch_sparse(A: CSR, X, row_scale=None, col_scale=None, diag=None, Z=None, layer_sum=None, out=None):
    import torch_sparse

    if "torch_sparse" not in A._cache:
        A._cache["torch_sparse"] = torch_sparse.SparseTensor(
            rowptr=A.indptr.long(), col=A.indices.long(), value=A.values, sparse_sizes=A.shape, is_sorted=True)
    Xc = _scaled_input(X, col_scale)
    Y = _epilogue_torch(torch_sparse.matmul(A._cache["torch_sparse"], Xc), row_scale, diag, Z, layer_sum, out)
    return Y.to(X.dtype)


def spmm(A: CSR, X: torch.Tensor, row_scale=None, col_scale=None, diag=None, Z=None, layer_sum=None,
         out=None, backend: str = "auto") -> torch.Tensor:
    """Dispatch ``out = rs ⊙ (A · (cs ⊙ X)) − c ⊙ Z`` (and ``layer_sum += out``) to a backend."""
    if (diag is None) != (Z is None):
        raise ValueError("diag and Z go together")
    b = resolve_backend(backend, X)
    if b in ("triton", "triton_tile"):
        from hellm_kernels.spmm_triton import spmm_triton

        return spmm_triton(A, X, row_scale, col_scale, diag, Z, layer_sum, out,
                           variant="tile" if b == "triton_tile" else "rows")
    fn = spmm_torch if b == "torch" else spmm_torch_sparse
    return fn(A, X, row_scale, col_scale, diag, Z, layer_sum, out)
