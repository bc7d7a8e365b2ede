"""Sparse hypergraph-convolution kernels (installed as ``hellm_kernels``).

Public functions (all differentiable, backward through stored transposes, deterministic):
    sparse_mm(A, X, ...)                  Y = rs ⊙ A (cs ⊙ X)
    propagate(op, X, layers, combine)     U2U / I2I propagation, two fused SpMMs per layer
    lightgcn_propagate(op, Eu, Ei, L)     LightGCN layer mean over Â
Each takes ``backend="auto" | "triton" | "triton_tile" | "torch" | "torch_sparse"``. ``auto`` probes the
candidates on CUDA (checked against torch CSR on the real matrix, timed, fastest correct kept for the process;
``hellm_kernels.probe``); ``kernel_choices()`` lists every decision with its reason (JSON-able, for a run log
and result JSON), ``reset_kernel_choices()`` forgets them. A forced backend is verified on first use and
raises ``KernelMismatchError`` on a mismatch.

The package owns the format it computes on — ``CSR`` (``hellm_kernels.csr``) and the operator forms
``TwoStageOperator`` / ``BipartiteOperator`` (``hellm_kernels.operators``: CSR + stored transpose + scale
vectors) — and imports nothing from ``hellm_ds``, which builds its graph operators on top of these types.
"""
from hellm_kernels.autograd import COMBINES, lightgcn_propagate, propagate, sddmm, sparse_mm
from hellm_kernels.csr import CSR
from hellm_kernels.errors import KernelUsageError
from hellm_kernels.operators import BipartiteOperator, TwoStageOperator
from hellm_kernels.probe import KernelMismatchError, KernelProbeWarning, kernel_choices, reset_kernel_choices
from hellm_kernels.spmm import BACKENDS, resolve_backend, spmm, torch_sparse_available, triton_available

__all__ = [
    "BACKENDS", "COMBINES", "CSR", "BipartiteOperator", "KernelMismatchError", "KernelProbeWarning",
    "KernelUsageError", "TwoStageOperator", "kernel_choices", "lightgcn_propagate", "propagate",
    "reset_kernel_choices", "resolve_backend", "sddmm", "sparse_mm", "spmm", "torch_sparse_available",
    "triton_available",
]
