"""Each operator against its dense definition (the authors' materialised form), built at O(nnz)."""
import subprocess
import sys
import textwrap

import numpy as np
import torch

from hellm_ds.graph.operators import bipartite_operator, item_hypergraph, user_hypergraph
from hellm_kernels import propagate
from hellm_kernels.csr import CSR
from tests.conftest import random_csr


def rownorm(M):
    s = M.sum(1, keepdim=True)
    return torch.where(s > 0, M / torch.where(s > 0, s, 1), torch.zeros_like(M))


def test_u2u_equals_rownorm_rrt_minus_diag():
    for seed in range(3):
        R, dense = random_csr(40, 25, 0.12, seed=seed, hub_row=1, empty_rows=(0, 7))
        dense[9] = 0
        dense[:, 24] = 0
        dense[9, 24] = 1  # a user whose only item nobody else bought: r = 0 → zero row
        R = CSR.from_coo(*dense.nonzero(as_tuple=True), (40, 25))
        RRt = dense @ dense.T
        authors = rownorm(RRt - torch.diag(torch.diag(RRt)))
        op = user_hypergraph(R)
        torch.testing.assert_close(op.to_dense(), authors, atol=1e-6, rtol=0)
        assert (op.to_dense()[9] == 0).all() and (op.to_dense()[0] == 0).all()
        X = torch.randn(40, 5, dtype=torch.float64)
        torch.testing.assert_close(propagate(op, X, 1, backend="torch"), authors @ X, atol=1e-6, rtol=0)


def test_i2i_equals_normalised_hht():
    H, dense = random_csr(30, 90, 0.06, seed=4, hub_row=2)
    dense[np.arange(30), np.arange(30)] = 1  # every item is in its own hyperedge (kNN includes self)
    H = CSR.from_coo(*dense.nonzero(as_tuple=True), (30, 90))
    HHt = dense @ dense.T
    d = HHt.sum(1).rsqrt()
    authors = d[:, None] * HHt * d[None, :]
    torch.testing.assert_close(item_hypergraph(H).to_dense(), authors, atol=1e-6, rtol=0)


def test_lightgcn_operator_equals_symmetric_normalisation():
    R, dense = random_csr(20, 15, 0.2, seed=5, empty_rows=(3,))
    A = torch.zeros(35, 35, dtype=torch.float64)
    A[:20, 20:] = dense
    A[20:, :20] = dense.T
    deg = A.sum(1)
    dinv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    torch.testing.assert_close(bipartite_operator(R).to_dense(), dinv[:, None] * A * dinv[None, :], atol=1e-6, rtol=0)


def test_transpose_is_csc():
    A, dense = random_csr(13, 21, 0.2, seed=6, values=True, empty_rows=(2,))
    AT = A.transpose()
    assert AT.shape == (21, 13)
    torch.testing.assert_close(AT.to_dense(), dense.T)
    for r in range(21):
        cols = AT.indices[AT.indptr[r] : AT.indptr[r + 1]]
        assert (cols[1:] > cols[:-1]).all()


def test_int32_indices_while_they_fit():
    A, _ = random_csr(5, 5, 0.5, seed=0)
    assert A.indptr.dtype == A.indices.dtype == torch.int32


def test_no_quadratic_intermediate(tmp_path):
    """Building and applying U2U/I2I for 60k users × 30k items stays far below one U² or I² float matrix."""
    code = textwrap.dedent(
        """
        import resource, torch, numpy as np
        from hellm_kernels.csr import CSR
        from hellm_ds.graph.operators import user_hypergraph, item_hypergraph
        from hellm_kernels import propagate
        U, I, nnz = 60_000, 30_000, 600_000
        rng = np.random.default_rng(0)
        key = np.unique(rng.integers(0, U, nnz) * I + (rng.zipf(1.5, nnz) % I))
        R = CSR.from_coo(key // I, key % I, (U, I))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        op = user_hypergraph(R)
        Y = propagate(op, torch.randn(U, 16), 2, "mean", backend="torch")
        H = CSR.from_coo(np.arange(I), np.arange(I), (I, I))
        Z = propagate(item_hypergraph(H), torch.randn(I, 16), 2, backend="torch")
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    grown = int(out.stdout.strip().splitlines()[-1])
    assert grown < 0.1 * 30_000**2 * 4, grown  # < 10% of one I² fp32 matrix (3.6 GB), let alone U² (14 GB)


def test_operator_types_are_the_kernel_packages():
    """graph/ builds the kernel package's types; the old import paths still name the same objects."""
    import hellm_ds.graph as graph
    import hellm_ds.graph.csr as graph_csr
    import hellm_ds.graph.operators as graph_ops
    import hellm_kernels.csr as kcsr
    import hellm_kernels.operators as kops

    assert graph.CSR is graph_csr.CSR is kcsr.CSR
    assert graph_csr.sparse_csr_tensor is kcsr.sparse_csr_tensor and graph_csr.index_dtype is kcsr.index_dtype
    assert graph.TwoStageOperator is graph_ops.TwoStageOperator is kops.TwoStageOperator
    assert graph.BipartiteOperator is graph_ops.BipartiteOperator is kops.BipartiteOperator
    R = CSR.from_coo([0, 1, 1], [1, 0, 2], (2, 3))
    assert isinstance(user_hypergraph(R), kops.TwoStageOperator)
    assert isinstance(bipartite_operator(R), kops.BipartiteOperator)
