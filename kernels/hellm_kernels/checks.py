"""Argument checks at the public boundary of the SpMM (``spmm``, ``spmm_triton``): shapes, devices, strides.

The Triton kernels address every operand as ``base + row * row_stride + column`` (2-D) or ``base + index``
(1-D): a unit inner stride is assumed everywhere. Here that assumption is made true or refused:

- inputs (X, Z, the scale vectors row_scale / col_scale / diag) with another inner stride are copied to a
  contiguous tensor (``contiguous_inputs``, Triton path only: the torch backends read any layout and key
  their caches on the scale vectors' identity, which a per-call copy would defeat). A 2-D input with a unit
  inner stride and a larger row stride (a column slice of a wider tensor) is read in place;
- outputs written in place (``out``, ``layer_sum``) are never silently copied: an inner stride ≠ 1, or rows
  that overlap (row stride < width), raise a ``KernelUsageError`` naming the argument and its strides — for
  every backend, so that a call's outcome does not depend on which kernel ``auto`` picks;
- the CSR arrays are made contiguous once, when the ``CSR`` is constructed (``CSR.__post_init__``).
"""
from __future__ import annotations

import torch

from hellm_kernels.errors import KernelUsageError


def unit_inner_stride(t: torch.Tensor) -> bool:
    return t.shape[-1] <= 1 or t.stride(-1) == 1


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if tuple(t.shape) != shape:
        raise KernelUsageError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise KernelUsageError(f"{name} is on {t.device}, X on {device}: every operand must be on one device")


def check_output(name: str, t: torch.Tensor, shape: tuple[int, int], device: torch.device) -> None:
    """An output written in place: right shape and device, unit inner stride, rows that do not overlap."""
    _check_shape(name, t, shape, device)
    rows, d = shape
    if not unit_inner_stride(t) or (rows > 1 and d > 0 and t.stride(0) < d):
        raise KernelUsageError(
            f"{name} is written in place and must have a unit inner stride and non-overlapping rows; got "
            f"shape {list(t.shape)} with stride {tuple(t.stride())} (pass a contiguous tensor, e.g. "
            f"torch.empty({rows}, {d}), or let the call allocate it)")


def check_spmm_args(A, X, row_scale=None, col_scale=None, diag=None, Z=None, layer_sum=None, out=None) -> None:
    """Validate the operands of ``out = rs ⊙ (A · (cs ⊙ X)) − c ⊙ Z ; layer_sum += out`` (no copies)."""
    n_rows, n_cols = A.shape
    if X.dim() != 2 or X.shape[0] != n_cols:
        raise KernelUsageError(f"X must be [{n_cols}, d] for a {n_rows} × {n_cols} matrix, got {list(X.shape)}")
    if A.device != X.device:
        raise KernelUsageError(f"the matrix is on {A.device}, X on {X.device}: every operand must be on one "
                               "device")
    if (diag is None) != (Z is None):
        raise KernelUsageError("diag and Z go together")
    d, dev = X.shape[1], X.device
    for name, t, n in (("row_scale", row_scale, n_rows), ("col_scale", col_scale, n_cols), ("diag", diag, n_rows)):
        if t is not None:
            _check_shape(name, t, (n,), dev)
    if Z is not None:
        _check_shape("Z", Z, (n_rows, d), dev)
    for name, t in (("out", out), ("layer_sum", layer_sum)):
        if t is not None:
            check_output(name, t, (n_rows, d), dev)


def contiguous_inputs(X, row_scale=None, col_scale=None, diag=None, Z=None):
    """The read-only operands with a unit inner stride (copied only when they do not have one)."""
    fix = lambda t: t if t is None or unit_inner_stride(t) else t.contiguous()  # noqa: E731
    return fix(X), fix(row_scale), fix(col_scale), fix(diag), fix(Z)
