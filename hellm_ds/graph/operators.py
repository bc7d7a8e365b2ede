"""The three propagation operators of METHOD §1 built from data, each kept in factored form (never R Rᵀ,
H Hᵀ or Â dense). The operator types themselves (CSR + transposes + scale vectors) are the kernel package's
(``hellm_kernels.operators``, re-exported here); this module decides what goes into them:

- ``BipartiteOperator`` — LightGCN's Â = D^-½ [[0, R], [Rᵀ, 0]] D^-½, applied to (E_u, E_i) as
  ``(ru ⊙ R(ri ⊙ E_i), ri ⊙ Rᵀ(ru ⊙ E_u))`` with ru, ri the inverse square-root degrees (0 for degree 0).
  It is symmetric.
- ``TwoStageOperator`` — ``P = diag(a) · M · Mᵀ · diag(b) − diag(c)`` applied as two SpMMs. Its transpose is
  the same form with a and b swapped (M Mᵀ is symmetric and diagonal factors commute). Instances:
    * user hypergraph  U2U = rownorm(R Rᵀ − diag(R Rᵀ)):  M = R, a = r⁻¹, b = 1, c = r⁻¹ ⊙ deg_u, where
      deg_u = R·1 and r = R(Rᵀ·1) − deg_u (users with r = 0 get a zero row);
    * item hypergraph  I2I = δ^-½ H Hᵀ δ^-½:  M = H, a = b = δ^-½, c = 0, with δ = H(Hᵀ·1).
"""
from __future__ import annotations

import torch

from hellm_kernels.csr import CSR
from hellm_kernels.operators import BipartiteOperator, TwoStageOperator

__all__ = [
    "BipartiteOperator", "TwoStageOperator", "bipartite_operator", "interaction_matrix", "item_hypergraph",
    "user_hypergraph",
]


def _segment_sum(csr: CSR, per_col: torch.Tensor) -> torch.Tensor:
    """Σ_j per_col[col_j] over each row's non-zeros (float64, exact for counts)."""
    rows = torch.repeat_interleave(torch.arange(csr.shape[0], device=csr.device), csr.row_nnz())
    out = torch.zeros(csr.shape[0], dtype=torch.float64, device=csr.device)
    return out.index_add_(0, rows, per_col.to(torch.float64)[csr.indices.long()])


def _safe_pow(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.where(x > 0, x.clamp_min(1e-300) ** p, torch.zeros_like(x))


def interaction_matrix(users, items, n_users: int, n_items: int) -> CSR:
    """R ∈ {0,1}^{U×I} from unique (user index 0..U-1, item id 1..I) pairs; column = item id − 1."""
    return CSR.from_coo(users, torch.as_tensor(items).numpy() - 1, (n_users, n_items))


def bipartite_operator(R: CSR, RT: CSR | None = None) -> BipartiteOperator:
    RT = R.transpose() if RT is None else RT
    ru = _safe_pow(R.row_nnz().double(), -0.5).float()
    ri = _safe_pow(RT.row_nnz().double(), -0.5).float()
    return BipartiteOperator(R, RT, ru, ri)


def user_hypergraph(R: CSR, RT: CSR | None = None) -> TwoStageOperator:
    """U2U = rownorm(R Rᵀ − diag(R Rᵀ)) in two-stage form (METHOD §1); O(nnz(R)) to build."""
    RT = R.transpose() if RT is None else RT
    deg_u = R.row_nnz().double()
    r = _segment_sum(R, RT.row_nnz()) - deg_u  # R(Rᵀ·1) − deg_u
    r_inv = _safe_pow(r, -1.0)
    return TwoStageOperator(R, RT, a=r_inv.float(), b=None, c=(r_inv * deg_u).float(), name="U2U")


def item_hypergraph(H: CSR, HT: CSR | None = None) -> TwoStageOperator:
    """I2I = δ^-½ H Hᵀ δ^-½ with δ = H(Hᵀ·1), in two-stage form (METHOD §1)."""
    HT = H.transpose() if HT is None else HT
    delta = _segment_sum(H, HT.row_nnz())
    d = _safe_pow(delta, -0.5).float()
    return TwoStageOperator(H, HT, a=d, b=d, c=None, name="I2I")
