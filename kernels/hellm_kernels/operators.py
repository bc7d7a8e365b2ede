"""The two operator forms the propagations compute on, each a CSR matrix, its stored transpose and scale
vectors (never a materialised product):

- ``TwoStageOperator`` — ``P = diag(a) · M · Mᵀ · diag(b) − diag(c)``, applied as two SpMMs (``Mᵀ`` first,
  with ``b`` on its input; then ``M``, with ``a`` and the ``− c ⊙ X`` diagonal in its epilogue). Its
  transpose is the same form with a and b swapped (M Mᵀ is symmetric and diagonal factors commute).
- ``BipartiteOperator`` — ``Â = D^-½ [[0, R], [Rᵀ, 0]] D^-½``, applied to (E_u, E_i) as
  ``(ru ⊙ R(ri ⊙ E_i), ri ⊙ Rᵀ(ru ⊙ E_u))`` with ``D^-½ = diag(ru, ri)``. It is symmetric.

Both keep the matrix and its transpose resident (``MT``, ``RT``) so that every stage, and the backward pass,
is a row-parallel CSR product without atomics. Which R, M and scale vectors make LightGCN's Â, the user
hypergraph U2U or the item hypergraph I2I is the graph builders' business (``hellm_ds.graph.operators``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hellm_kernels.csr import CSR


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
