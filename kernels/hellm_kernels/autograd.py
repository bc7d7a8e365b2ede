"""Differentiable sparse products and propagations whose backward passes use the stored transposes.

Every operator here is linear in its input, so backward is the transposed operator applied to the incoming
gradient: no activations are saved, no atomics are used, and forward and backward are bit-deterministic
(the Triton kernels reduce in a fixed order; so do the CPU backends).

- ``sparse_mm(A, X, AT, row_scale, col_scale, values)``: Y = rs ⊙ A_v (cs ⊙ X); gradients to X and, when
  ``values`` requires grad, to the values (an SDDMM, computed in chunks).
- ``propagate(op, X, layers, combine)``: P^L X ("last"), Σ_{l≤L} P^l X ("sum") or its mean ("mean") for a
  ``TwoStageOperator`` P — two fused SpMMs per layer (first stage, then second stage with the diagonal
  term and the running layer sum in its epilogue).
- ``lightgcn_propagate(op, E_u, E_i, layers)``: LightGCN's layer mean over Â^l [E_u; E_i].
"""
from __future__ import annotations

import torch

from hellm_kernels.csr import CSR
from hellm_kernels.operators import BipartiteOperator, TwoStageOperator
from hellm_kernels.spmm import spmm

COMBINES = ("last", "sum", "mean")


def _with_values(A: CSR, values: torch.Tensor | None) -> CSR:
    if values is None:
        return A
    # same structure: keep the launch plan, drop caches that hold A's own values (torch CSR views)
    plan = {k: v for k, v in A._cache.items() if k == "triton_plan"}
    return CSR(A.indptr, A.indices, A.shape, values, plan)


class _SparseMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, values, A, AT, row_scale, col_scale, backend):
        ctx.save_for_backward(X if values is not None and values.requires_grad else None, values)
        ctx.A, ctx.AT, ctx.rs, ctx.cs, ctx.backend = A, AT, row_scale, col_scale, backend
        return spmm(_with_values(A, values), X, row_scale=row_scale, col_scale=col_scale, backend=backend)

    @staticmethod
    def backward(ctx, G):
        X, values = ctx.saved_tensors
        A, AT = ctx.A, ctx.AT
        gX = gV = None
        G = G.contiguous()
        if ctx.needs_input_grad[0]:
            vt = None if values is None else values[A_transpose_perm(A).to(values.device)]
            gX = spmm(_with_values(AT, vt), G, row_scale=ctx.cs, col_scale=ctx.rs, backend=ctx.backend)
        if ctx.needs_input_grad[1]:
            gV = sddmm(A, G, X, ctx.rs, ctx.cs)
        return gX, gV, None, None, None, None, None


def A_transpose_perm(A: CSR) -> torch.Tensor:
    """Permutation p with AT.values = A.values[p] (stable sort by column), cached on A."""
    if "transpose_perm" not in A._cache:
        A._cache["transpose_perm"] = torch.argsort(A.indices.long(), stable=True)
    return A._cache["transpose_perm"]


def sddmm(A: CSR, G: torch.Tensor, X: torch.Tensor, row_scale=None, col_scale=None,
          chunk: int = 1 << 20) -> torch.Tensor:
    """dV_j = rs[r_j] · cs[c_j] · ⟨G[r_j], X[c_j]⟩ over A's non-zeros, ``chunk`` at a time (O(chunk·d) memory)."""
    rows = torch.repeat_interleave(torch.arange(A.shape[0], device=A.device), A.row_nnz())
    cols = A.indices.long()
    out = torch.empty(A.nnz, dtype=G.dtype, device=G.device)
    for lo in range(0, A.nnz, chunk):
        r, c = rows[lo : lo + chunk], cols[lo : lo + chunk]
        v = (G[r] * X[c].to(G.dtype)).sum(-1)
        if row_scale is not None:
            v = v * row_scale[r].to(v.dtype)
        if col_scale is not None:
            v = v * col_scale[c].to(v.dtype)
        out[lo : lo + chunk] = v
    return out


def sparse_mm(A: CSR, X: torch.Tensor, AT: CSR | None = None, row_scale=None, col_scale=None,
              values: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Y = rs ⊙ A (cs ⊙ X), differentiable in X and ``values`` (A's non-zeros, in A's order)."""
    if AT is None:
        if "transpose" not in A._cache:
            A._cache["transpose"] = A.transpose()
        AT = A._cache["transpose"]
    return _SparseMM.apply(X, values, A, AT, row_scale, col_scale, backend)


def _two_stage_layers(op: TwoStageOperator, X: torch.Tensor, layers: int, combine: str, backend: str):
    total = None
    if combine != "last":
        total = X.to(torch.float64 if X.dtype == torch.float64 else torch.float32).clone()
    cur = X.contiguous()
    stage1 = None
    for _ in range(layers):
        stage1 = spmm(op.MT, cur, col_scale=op.b, out=stage1, backend=backend)
        cur = spmm(op.M, stage1, row_scale=op.a, diag=op.c, Z=None if op.c is None else cur,
                   layer_sum=total, backend=backend)
    if combine == "last":
        return cur
    if combine == "mean":
        total /= layers + 1
    return total.to(X.dtype)


class _Propagate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, op, layers, combine, backend):
        ctx.op, ctx.layers, ctx.combine, ctx.backend = op, layers, combine, backend
        return _two_stage_layers(op, X, layers, combine, backend)

    @staticmethod
    def backward(ctx, G):
        # the propagation is linear: its adjoint is the same propagation through Pᵀ
        return _Propagate.apply(G.contiguous(), ctx.op.transpose(), ctx.layers, ctx.combine, ctx.backend), \
            None, None, None, None


def propagate(op: TwoStageOperator, X: torch.Tensor, layers: int, combine: str = "last",
              backend: str = "auto") -> torch.Tensor:
    """P^L X, Σ_{l=0..L} P^l X or their mean, for a two-stage hypergraph operator (differentiable in X)."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if layers < 0:
        raise ValueError(f"layers must be ≥ 0, got {layers}")
    if X.shape[0] != op.n:
        raise ValueError(f"X has {X.shape[0]} rows, the operator {op.n}")
    return _Propagate.apply(X, op, layers, combine, backend)


def _lightgcn_layers(op: BipartiteOperator, Eu, Ei, layers, backend):
    acc_dt = torch.float64 if Eu.dtype == torch.float64 else torch.float32
    su, si = Eu.to(acc_dt).clone(), Ei.to(acc_dt).clone()
    cu, ci = Eu.contiguous(), Ei.contiguous()
    for _ in range(layers):
        nu = spmm(op.R, ci, row_scale=op.ru, col_scale=op.ri, layer_sum=su, backend=backend)
        ni = spmm(op.RT, cu, row_scale=op.ri, col_scale=op.ru, layer_sum=si, backend=backend)
        cu, ci = nu, ni
    return (su / (layers + 1)).to(Eu.dtype), (si / (layers + 1)).to(Ei.dtype)


class _LightGCN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Eu, Ei, op, layers, backend):
        ctx.op, ctx.layers, ctx.backend = op, layers, backend
        return _lightgcn_layers(op, Eu, Ei, layers, backend)

    @staticmethod
    def backward(ctx, Gu, Gi):
        gu, gi = _LightGCN.apply(Gu.contiguous(), Gi.contiguous(), ctx.op, ctx.layers, ctx.backend)  # Â = Âᵀ
        return gu, gi, None, None, None


def lightgcn_propagate(op: BipartiteOperator, Eu: torch.Tensor, Ei: torch.Tensor, layers: int,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """LightGCN: mean over l = 0..L of Â^l [E_u; E_i], returned as (users, items); differentiable."""
    if Eu.shape[0] != op.R.shape[0] or Ei.shape[0] != op.R.shape[1]:
        raise ValueError(f"embeddings {tuple(Eu.shape)}, {tuple(Ei.shape)} do not match R {op.R.shape}")
    return _LightGCN.apply(Eu, Ei, op, layers, backend)
