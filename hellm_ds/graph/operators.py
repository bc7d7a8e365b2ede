"""The three propagation operators of METHOD §1, each kept in factored form (never R Rᵀ, H Hᵀ or Â dense).

- ``BipartiteOperator`` — LightGCN's Â = D^-½ [[0, R], [Rᵀ, 0]] D^-½, applied to (E_u, E_i) as
  ``(ru ⊙ R(ri ⊙ E_i), ri ⊙ Rᵀ(ru ⊙ E_u))`` with ru, ri the inverse square-root degrees (0 for degree 0).
  It is symmetric.
- ``TwoStageOperator`` — ``P = diag(a) · M · Mᵀ · diag(b) − diag(c)`` applied as two SpMMs. Its transpose is
  the same form with a and b swapped (M Mᵀ is symmetric and diagonal factors commute). Instances:
    * user hypergraph  U2U = rownorm(R Rᵀ − diag(R Rᵀ)):  M = R, a = r⁻¹, b = 1, c = r⁻¹ ⊙ deg_u, where
      deg_u = R·1 and r = R(Rᵀ·1) − deg_u (users with r = 0 get a zero row);
    * item hypergraph  I2I = δ^-½ H Hᵀ δ^-½:  M = H, a = b = δ^-½, c = 0, with δ = H(Hᵀ·1).

Each operator keeps M and its transpose resident (``MT``) so that both stages, and the backward pass, are
row-parallel CSR products without atomics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hellm_ds.graph.csr import CSR


def _segment_sum(csr: CSR, per_col: torch.Tensor) -> torch.Tensor:
    """Σ_j per_col[col_j] over each row's non-zeros (float64, exact for counts)."""
    rows = torch.repeat_interleave(torch.arange(csr.shape[0], device=csr.device), csr.row_nnz())
    out = torch.zeros(csr.shape[0], dtype=torch.float64, device=csr.device)
    return out.index_add_(0, rows, per_col.to(torch.float64)[csr.indices.long()])


def _safe_pow(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.where(x > 0, x.clamp_min(1e-300) ** p, torch.zeros_like(x))


@dataclass(frozen=True, eq=False)
class TwoStageOperator:
    M: CSR  # n × m
    MT: CSR  # m × n
    a: torch.Tensor | None  # [n] row scale after the second stage (None = 1)
    b: torch.Tensor | None  # [n] scale of the input before the first stage (None = 1)
    c: torch.Tensor | None  # [n] diagonal subtracted (None = 0)
    name: str = "two_stage"

    @property
    def n(self) -> int:
        return self.M.shape[0]

    def transpose(self) -> "TwoStageOperator":
        return TwoStageOperator(self.M, self.MT, self.b, self.a, self.c, self.name + "ᵀ")

    def to(self, device) -> "TwoStageOperator":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TwoStageOperator(self.M.to(device), self.MT.to(device), mv(self.a), mv(self.b), mv(self.c), self.name)

    def to_dense(self) -> torch.Tensor:
        """Dense float64 matrix — for tests on tiny graphs only."""
        M = self.M.to_dense()
        ones = torch.ones(self.n, dtype=torch.float64)
        a = ones if self.a is None else self.a.cpu().double()
        b = ones if self.b is None else self.b.cpu().double()
        c = torch.zeros_like(ones) if self.c is None else self.c.cpu().double()
        return a[:, None] * (M @ M.T) * b[None, :] - torch.diag(c)


@dataclass(frozen=True, eq=False)
class BipartiteOperator:
    R: CSR  # U × I
    RT: CSR  # I × U
    ru: torch.Tensor  # [U] deg_u^-½ (0 where deg = 0)
    ri: torch.Tensor  # [I]

    def to(self, device) -> "BipartiteOperator":
        return BipartiteOperator(self.R.to(device), self.RT.to(device), self.ru.to(device), self.ri.to(device))

    def to_dense(self) -> torch.Tensor:
        """Dense float64 (U+I)² matrix — for tests on tiny graphs only."""
        R = self.R.to_dense()
        U, I = R.shape
        A = torch.zeros(U + I, U + I, dtype=torch.float64)
        A[:U, U:] = R
        A[U:, :U] = R.T
        d = torch.cat([self.ru, self.ri]).cpu().double()
        return d[:, None] * A * d[None, :]


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
