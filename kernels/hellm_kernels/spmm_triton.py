"""Triton CSR SpMM with a fused epilogue — the hypergraph convolution kernel (METHOD §2).

Computes, for every row r of a CSR matrix A (values optional):

    acc[r] = Σ_{j ∈ row r}  v_j · cs[col_j] · X[col_j]                     (fp32 accumulation; fp64 for fp64 X)
    out[r] = rs[r] · acc[r] − c[r] · Z[r]                                  (row scale, diagonal term)
    sum[r] += out[r]                                                       (optional running layer sum)

which covers every stage of the project's operators: LightGCN (rs, cs = inverse square-root degrees), both
stages of U2U (cs on the way in, rs and the −deg ⊙ X diagonal on the way out) and of I2I, and their
transposes for the backward pass.

Work decomposition (one launch, plus one for long rows when there are any):
- ``GROUP`` consecutive rows per program, each processed ``BLOCK_NNZ`` non-zeros at a time with all of a
  ``BLOCK_D``-wide column slab of X gathered at once (short rows: amortises the launch per program);
- rows with more than ``SEG`` non-zeros ("hubs") are cut into ``SEG``-long segments handled by extra
  programs of the same launch, each writing a partial sum; a second small kernel adds a hub's partials in
  a fixed order and applies the epilogue. A row of n non-zeros spreads over ~sqrt(n/32) programs (10⁵ → 56,
  10⁶ → 177) instead of serialising the launch, and no atomics are used anywhere: results are bit-identical
  run to run.

Two variants of the short-row path, same plan, same hub path, same results (backend ``triton`` and
``triton_tile``); which is faster is the GPU benchmark's call (``launch/bench_kernels.py`` times both):
- ``rows``: the GROUP rows of a program one after another, each in ``BLOCK_NNZ``-long chunks;
- ``tile``: the GROUP rows at once as a [GROUP, BLOCK_NNZ, BLOCK_D] tile per chunk — one chain of dependent
  loads (row pointers → column indices → X rows) per chunk for all the rows instead of one per row, so a
  program keeps GROUP rows' gathers in flight; rows shorter than the group's longest idle (masked: no
  memory traffic).

The PyTorch reference beside it is ``kernels.spmm.spmm_torch``; ``tests/kernels/test_spmm_triton.py``
compares the two against a float64 dense product.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hellm_kernels.checks import check_spmm_args, contiguous_inputs
from hellm_kernels.csr import CSR


@triton.jit
def _row_dot(lo, hi, indices_ptr, values_ptr, col_scale_ptr, x_ptr, stride_x, offs_d, mask_d,
             HAS_VALUES: tl.constexpr, HAS_COL_SCALE: tl.constexpr, BLOCK_NNZ: tl.constexpr,
             BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    acc = tl.zeros([BLOCK_D], ACC)
    for k in range(lo, hi, BLOCK_NNZ):
        offs = k + tl.arange(0, BLOCK_NNZ)
        m = offs < hi
        col = tl.load(indices_ptr + offs, mask=m, other=0).to(tl.int64)
        xt = tl.load(x_ptr + col[:, None] * stride_x + offs_d[None, :], mask=m[:, None] & mask_d[None, :],
                     other=0.0).to(ACC)
        if HAS_VALUES:
            xt = xt * tl.load(values_ptr + offs, mask=m, other=0.0).to(ACC)[:, None]
        if HAS_COL_SCALE:
            xt = xt * tl.load(col_scale_ptr + col, mask=m, other=0.0).to(ACC)[:, None]
        acc += tl.sum(xt, axis=0)
    return acc


@triton.jit
def _epilogue(acc, row, offs_d, mask_d, out_ptr, stride_out, row_scale_ptr, diag_ptr, z_ptr, stride_z,
              sum_ptr, stride_sum, HAS_ROW_SCALE: tl.constexpr, HAS_DIAG: tl.constexpr, HAS_SUM: tl.constexpr,
              ACC: tl.constexpr):
    """One row (``row`` a scalar, ``acc``/``offs_d``/``mask_d`` [BLOCK_D]) or a tile of rows (``row``
    [GROUP, 1] valid indices, ``offs_d`` [1, BLOCK_D], ``acc``/``mask_d`` [GROUP, BLOCK_D])."""
    if HAS_ROW_SCALE:
        acc = acc * tl.load(row_scale_ptr + row).to(ACC)
    if HAS_DIAG:
        z = tl.load(z_ptr + row * stride_z + offs_d, mask=mask_d, other=0.0).to(ACC)
        acc = acc - tl.load(diag_ptr + row).to(ACC) * z
    tl.store(out_ptr + row * stride_out + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask_d)
    if HAS_SUM:
        s_ptrs = sum_ptr + row * stride_sum + offs_d
        s = tl.load(s_ptrs, mask=mask_d, other=0.0).to(ACC)
        tl.store(s_ptrs, (s + acc).to(sum_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _segment_partial(seg, seg_lo_ptr, seg_hi_ptr, partial_ptr, stride_p, indices_ptr, values_ptr,
                     col_scale_ptr, x_ptr, stride_x, offs_d, mask_d, HAS_VALUES: tl.constexpr,
                     HAS_COL_SCALE: tl.constexpr, BLOCK_NNZ: tl.constexpr, BLOCK_D: tl.constexpr,
                     ACC: tl.constexpr):
    """One segment of a hub row: its partial sum, reduced in order by ``_hub_reduce_kernel``."""
    lo = tl.load(seg_lo_ptr + seg).to(tl.int64)
    hi = tl.load(seg_hi_ptr + seg).to(tl.int64)
    acc = _row_dot(lo, hi, indices_ptr, values_ptr, col_scale_ptr, x_ptr, stride_x, offs_d, mask_d,
                   HAS_VALUES, HAS_COL_SCALE, BLOCK_NNZ, BLOCK_D, ACC)
    tl.store(partial_ptr + seg * stride_p + offs_d, acc, mask=mask_d)


@triton.jit
def _spmm_kernel(indptr_ptr, indices_ptr, values_ptr, col_scale_ptr, x_ptr, stride_x,
                 out_ptr, stride_out, row_scale_ptr, diag_ptr, z_ptr, stride_z, sum_ptr, stride_sum,
                 seg_lo_ptr, seg_hi_ptr, partial_ptr, stride_p,
                 n_rows, n_groups, D, SEG,
                 GROUP: tl.constexpr, BLOCK_NNZ: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_VALUES: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                 HAS_DIAG: tl.constexpr, HAS_SUM: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if pid < n_groups:
        for i in range(GROUP):
            row = pid.to(tl.int64) * GROUP + i  # int64: row * stride can pass 2³¹ at 10M+ rows
            if row < n_rows:
                lo = tl.load(indptr_ptr + row).to(tl.int64)
                hi = tl.load(indptr_ptr + row + 1).to(tl.int64)
                if hi - lo <= SEG:  # longer rows are done by the segment programs below
                    acc = _row_dot(lo, hi, indices_ptr, values_ptr, col_scale_ptr, x_ptr, stride_x, offs_d,
                                   mask_d, HAS_VALUES, HAS_COL_SCALE, BLOCK_NNZ, BLOCK_D, ACC)
                    _epilogue(acc, row, offs_d, mask_d, out_ptr, stride_out, row_scale_ptr, diag_ptr, z_ptr,
                              stride_z, sum_ptr, stride_sum, HAS_ROW_SCALE, HAS_DIAG, HAS_SUM, ACC)
    else:
        _segment_partial(pid - n_groups, seg_lo_ptr, seg_hi_ptr, partial_ptr, stride_p, indices_ptr,
                         values_ptr, col_scale_ptr, x_ptr, stride_x, offs_d, mask_d, HAS_VALUES,
                         HAS_COL_SCALE, BLOCK_NNZ, BLOCK_D, ACC)


@triton.jit
def _spmm_tile_kernel(indptr_ptr, indices_ptr, values_ptr, col_scale_ptr, x_ptr, stride_x,
                      out_ptr, stride_out, row_scale_ptr, diag_ptr, z_ptr, stride_z, sum_ptr, stride_sum,
                      seg_lo_ptr, seg_hi_ptr, partial_ptr, stride_p,
                      n_rows, n_groups, D, SEG,
                      GROUP: tl.constexpr, BLOCK_NNZ: tl.constexpr, BLOCK_D: tl.constexpr,
                      SEG_NNZ: tl.constexpr,
                      HAS_VALUES: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                      HAS_DIAG: tl.constexpr, HAS_SUM: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if pid < n_groups:
        rows = pid.to(tl.int64) * GROUP + tl.arange(0, GROUP)
        live = rows < n_rows
        lo = tl.load(indptr_ptr + rows, mask=live, other=0).to(tl.int64)
        n = tl.load(indptr_ptr + rows + 1, mask=live, other=0).to(tl.int64) - lo
        live = live & (n <= SEG)  # longer rows are done by the segment programs below
        n = tl.where(live, n, 0)
        acc = tl.zeros([GROUP, BLOCK_D], ACC)
        for k in range(0, tl.max(n, axis=0), BLOCK_NNZ):
            kk = k + tl.arange(0, BLOCK_NNZ)
            m = kk[None, :] < n[:, None]  # [GROUP, BLOCK_NNZ]
            pos = lo[:, None] + kk[None, :]
            col = tl.load(indices_ptr + pos, mask=m, other=0).to(tl.int64)
            xt = tl.load(x_ptr + col[:, :, None] * stride_x + offs_d[None, None, :],
                         mask=m[:, :, None] & mask_d[None, None, :], other=0.0).to(ACC)
            if HAS_VALUES:
                xt = xt * tl.load(values_ptr + pos, mask=m, other=0.0).to(ACC)[:, :, None]
            if HAS_COL_SCALE:
                xt = xt * tl.load(col_scale_ptr + col, mask=m, other=0.0).to(ACC)[:, :, None]
            acc += tl.sum(xt, axis=1)
        # rows past the end and hub rows are not stored here; clamped indices keep their loads in bounds
        _epilogue(acc, tl.where(live, rows, 0)[:, None], offs_d[None, :], live[:, None] & mask_d[None, :],
                  out_ptr, stride_out, row_scale_ptr, diag_ptr, z_ptr, stride_z, sum_ptr, stride_sum,
                  HAS_ROW_SCALE, HAS_DIAG, HAS_SUM, ACC)
    else:
        _segment_partial(pid - n_groups, seg_lo_ptr, seg_hi_ptr, partial_ptr, stride_p, indices_ptr,
                         values_ptr, col_scale_ptr, x_ptr, stride_x, offs_d, mask_d, HAS_VALUES,
                         HAS_COL_SCALE, SEG_NNZ, BLOCK_D, ACC)


@triton.jit
def _hub_reduce_kernel(hub_rows_ptr, hub_first_ptr, partial_ptr, stride_p,
                       out_ptr, stride_out, row_scale_ptr, diag_ptr, z_ptr, stride_z, sum_ptr, stride_sum, D,
                       BLOCK_D: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_DIAG: tl.constexpr,
                       HAS_SUM: tl.constexpr, ACC: tl.constexpr):
    h = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row = tl.load(hub_rows_ptr + h).to(tl.int64)
    first = tl.load(hub_first_ptr + h).to(tl.int64)
    last = tl.load(hub_first_ptr + h + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_D], ACC)
    for s in range(first, last):  # fixed order: deterministic
        acc += tl.load(partial_ptr + s * stride_p + offs_d, mask=mask_d, other=0.0)
    _epilogue(acc, row, offs_d, mask_d, out_ptr, stride_out, row_scale_ptr, diag_ptr, z_ptr, stride_z,
              sum_ptr, stride_sum, HAS_ROW_SCALE, HAS_DIAG, HAS_SUM, ACC)


@dataclass(frozen=True)
class SpmmPlan:
    """Per-matrix launch plan, computed once and cached on the CSR: row groups and hub segments."""

    group: int
    seg: int
    n_groups: int
    seg_lo: torch.Tensor  # int64 [n_segments]
    seg_hi: torch.Tensor
    hub_rows: torch.Tensor  # int64 [n_hubs]
    hub_first: torch.Tensor  # int64 [n_hubs + 1] into the segments

    @property
    def n_segments(self) -> int:
        return int(self.seg_lo.numel())


def make_plan(A: CSR, seg: int | None = None, group: int | None = None) -> SpmmPlan:
    n_rows = A.shape[0]
    nnz_row = A.row_nnz()
    mean = max(A.nnz / max(n_rows, 1), 1.0)
    if seg is None:  # a segment is a few times the typical row, at least 256 non-zeros
        seg = int(max(256, 8 * mean))
    if group is None:  # aim for ~128 non-zeros of work per program on short rows
        group = int(min(16, max(1, round(128 / mean))))
    hubs = torch.nonzero(nnz_row > seg).flatten()
    hub_nnz = nnz_row[hubs]
    # A hub of n non-zeros gets about sqrt(n / 32) segments (never shorter than `seg`): segment programs and
    # the serial reduction of their partials then take balanced time, even for a row with millions.
    n_seg = torch.minimum((hub_nnz + seg - 1) // seg, torch.sqrt(hub_nnz / 32.0).ceil().long().clamp_min(2))
    seg_len = (hub_nnz + n_seg - 1) // n_seg
    hub_first = torch.zeros(hubs.numel() + 1, dtype=torch.int64, device=A.device)
    torch.cumsum(n_seg, 0, out=hub_first[1:])
    seg_row = torch.repeat_interleave(hubs, n_seg)
    within = torch.arange(int(hub_first[-1]), device=A.device) - torch.repeat_interleave(hub_first[:-1], n_seg)
    start = A.indptr.long()[seg_row] + within * torch.repeat_interleave(seg_len, n_seg)
    end = torch.minimum(start + torch.repeat_interleave(seg_len, n_seg), A.indptr.long()[seg_row + 1])
    return SpmmPlan(group, seg, (n_rows + group - 1) // group, start, end, hubs, hub_first)


def _plan(A: CSR) -> SpmmPlan:
    if "triton_plan" not in A._cache:
        A._cache["triton_plan"] = make_plan(A)
    return A._cache["triton_plan"]


VARIANTS = ("rows", "tile")
TILE_ELEMENTS = 2048  # the tile variant's [GROUP, BLOCK_NNZ, BLOCK_D] gather per chunk (16 values per thread)


def tile_shape(block_d: int) -> tuple[int, int]:
    """(GROUP, BLOCK_NNZ) of the tile variant: chunks of 16 non-zeros (a typical row) at d ≤ 64, 8 wider,
    as many rows as fit ``TILE_ELEMENTS`` (≤ 16)."""
    block_nnz = 32 if block_d <= 16 else 16 if block_d <= 64 else 8
    return max(1, min(16, TILE_ELEMENTS // (block_nnz * block_d))), block_nnz


def spmm_triton(A: CSR, X: torch.Tensor, row_scale=None, col_scale=None, diag=None, Z=None,
                layer_sum=None, out: torch.Tensor | None = None, plan: SpmmPlan | None = None,
                variant: str = "rows") -> torch.Tensor:
    """``out = rs ⊙ (A · (cs ⊙ X)) − c ⊙ Z`` and ``layer_sum += out`` in one pass (see module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    # the kernels assume a unit inner stride everywhere: outputs are checked (never copied), inputs fixed
    check_spmm_args(A, X, row_scale, col_scale, diag, Z, layer_sum, out)
    X, row_scale, col_scale, diag, Z = contiguous_inputs(X, row_scale, col_scale, diag, Z)
    n_rows, n_cols = A.shape
    D = X.shape[1]
    if D > 512:
        raise ValueError(f"feature width {D} > 512 is not supported by the Triton SpMM")
    plan = plan or _plan(A)
    out = torch.empty(n_rows, D, dtype=X.dtype, device=X.device) if out is None else out
    acc = tl.float64 if X.dtype == torch.float64 else tl.float32
    BLOCK_D = min(triton.next_power_of_2(max(D, 1)), 128)
    BLOCK_NNZ = 32 if BLOCK_D <= 64 else 16
    partial = torch.empty(max(plan.n_segments, 1), D, dtype=torch.float64 if X.dtype == torch.float64 else torch.float32,
                          device=X.device)
    dummy = X
    zt = Z if Z is not None else dummy
    st = layer_sum if layer_sum is not None else dummy
    flags = dict(HAS_VALUES=A.values is not None, HAS_COL_SCALE=col_scale is not None,
                 HAS_ROW_SCALE=row_scale is not None, HAS_DIAG=diag is not None, HAS_SUM=layer_sum is not None,
                 ACC=acc)
    args = (A.indptr, A.indices, A.values if A.values is not None else dummy,
            col_scale if col_scale is not None else dummy, X, X.stride(0),
            out, out.stride(0), row_scale if row_scale is not None else dummy,
            diag if diag is not None else dummy, zt, zt.stride(0), st, st.stride(0),
            plan.seg_lo, plan.seg_hi, partial, partial.stride(0))
    if variant == "rows":
        grid = (plan.n_groups + plan.n_segments, triton.cdiv(D, BLOCK_D))
        _spmm_kernel[grid](*args, n_rows, plan.n_groups, D, plan.seg,
                           GROUP=plan.group, BLOCK_NNZ=BLOCK_NNZ, BLOCK_D=BLOCK_D, **flags)
    else:
        group, block_nnz = tile_shape(BLOCK_D)
        n_groups = triton.cdiv(n_rows, group)
        grid = (n_groups + plan.n_segments, triton.cdiv(D, BLOCK_D))
        _spmm_tile_kernel[grid](*args, n_rows, n_groups, D, plan.seg, GROUP=group, BLOCK_NNZ=block_nnz,
                                BLOCK_D=BLOCK_D, SEG_NNZ=BLOCK_NNZ, **flags)
    if plan.hub_rows.numel():
        _hub_reduce_kernel[(plan.hub_rows.numel(), triton.cdiv(D, BLOCK_D))](
            plan.hub_rows, plan.hub_first, partial, partial.stride(0),
            out, out.stride(0), row_scale if row_scale is not None else dummy, diag if diag is not None else dummy,
            zt, zt.stride(0), st, st.stride(0), D,
            BLOCK_D=BLOCK_D, HAS_ROW_SCALE=flags["HAS_ROW_SCALE"], HAS_DIAG=flags["HAS_DIAG"],
            HAS_SUM=flags["HAS_SUM"], ACC=acc,
        )
    return out
