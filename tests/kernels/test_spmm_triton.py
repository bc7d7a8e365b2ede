"""The Triton SpMM and the torch backend against a float64 dense reference. Inputs live on ``DEVICE``: the
GPU when there is one (compiled kernels, cuSPARSE), else the CPU (interpreted Triton, MKL)."""
import pytest
import torch

from hellm_kernels.csr import CSR
from hellm_kernels.spmm import spmm, torch_sparse_available
from tests.conftest import DEVICE, random_csr, require

# a declared test dependency: missing, the module fails to collect (CI goes red) instead of skipping
triton = require("triton", "test", "pip install -e .[test] (no GPU needed: it runs interpreted on CPU)")
from hellm_kernels.spmm_triton import make_plan  # noqa: E402

SPMM_BACKENDS = ("triton", "triton_tile", "torch") + (("torch_sparse",) if torch_sparse_available() else ())


def small_plan(A, seg=5, group=3):
    """A on DEVICE, with the hub path forced (rows longer than `seg` split into segments) on tiny graphs."""
    A = A.to(DEVICE)
    A._cache["triton_plan"] = make_plan(A, seg=seg, group=group)
    return A


def reference(dense, X, rs=None, cs=None, diag=None, Z=None):
    Y = dense @ (X.double() * (1 if cs is None else cs.double()[:, None]))
    if rs is not None:
        Y = Y * rs.double()[:, None]
    if diag is not None:
        Y = Y - diag.double()[:, None] * Z.double()
    return Y


@pytest.mark.parametrize("d", [1, 50, 64, 65, 130])
@pytest.mark.parametrize("values", [False, True])
def test_spmm_matches_dense(d, values):
    A, dense = random_csr(23, 17, 0.25, seed=d, hub_row=4, empty_rows=(0, 9), values=values)
    A = small_plan(A)
    X = torch.randn(17, d, dtype=torch.float64)
    for backend in SPMM_BACKENDS:
        Y = spmm(A, X.to(DEVICE), backend=backend)
        torch.testing.assert_close(Y.cpu(), reference(dense, X), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_epilogue_and_layer_sum(dtype):
    A, dense = random_csr(19, 19, 0.3, seed=1, hub_row=2, empty_rows=(5,))
    A = small_plan(A, seg=4, group=2)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(19, 33, generator=g, dtype=dtype)
    rs, cs, diag = (torch.rand(19, generator=g) for _ in range(3))
    ref = reference(dense, X, rs, cs, diag, X)
    X, rs, cs, diag = (t.to(DEVICE) for t in (X, rs, cs, diag))
    for backend in SPMM_BACKENDS:
        total = torch.ones(19, 33, dtype=dtype, device=DEVICE)
        Y = spmm(A, X, row_scale=rs, col_scale=cs, diag=diag, Z=X, layer_sum=total, backend=backend)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(Y.cpu().double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(total.cpu().double(), ref + 1, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["triton", "triton_tile"])
def test_int64_indices_and_all_empty(backend):
    A, dense = random_csr(12, 9, 0.4, seed=3, hub_row=1, index_dtype=torch.int64)
    A = small_plan(A, seg=3)
    X = torch.randn(9, 8, dtype=torch.float64)
    torch.testing.assert_close(spmm(A, X.to(DEVICE), backend=backend).cpu(), dense @ X)
    empty = CSR(torch.zeros(6, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), (5, 9)).to(DEVICE)
    Y = spmm(empty, X.to(DEVICE), backend=backend)
    assert torch.equal(Y.cpu(), torch.zeros(5, 8, dtype=torch.float64))


def test_hub_rows_are_split_into_balanced_segments():
    A, _ = random_csr(10, 200, 0.02, seed=4, hub_row=3)
    plan = make_plan(A, seg=16, group=4)
    assert plan.hub_rows.tolist() == [3]
    lo, hi = int(A.indptr[3]), int(A.indptr[4])
    # contiguous segments that tile the hub row exactly, spread over several programs
    assert plan.n_segments == 3 and plan.seg_lo[0] == lo and plan.seg_hi[-1] == hi
    assert torch.equal(plan.seg_lo[1:], plan.seg_hi[:-1])
    # a 10⁵-non-zero row: ~sqrt(10⁵/32) ≈ 56 programs of ~1.8k non-zeros, not one serial program
    indptr = torch.tensor([0, 5, 100_005, 100_010], dtype=torch.int64)
    big = CSR(indptr, torch.zeros(100_010, dtype=torch.int32), (3, 1))
    plan = make_plan(big, seg=256)
    assert plan.hub_rows.tolist() == [1] and 40 <= plan.n_segments <= 80
    assert int((plan.seg_hi - plan.seg_lo).sum()) == 100_000


@pytest.mark.parametrize("backend", ["triton", "triton_tile"])
def test_bit_deterministic_across_runs(backend):
    A, _ = random_csr(30, 25, 0.3, seed=5, hub_row=7)
    A = small_plan(A, seg=4)
    X = torch.randn(25, 20, device=DEVICE)
    runs = [spmm(A, X, backend=backend) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_tile_variant_rows_of_every_length_in_one_group():
    """The tile variant's chunks run to the group's longest row: mixed lengths (0 … > BLOCK_NNZ, a hub)
    in the same group, and more rows than one group."""
    from hellm_kernels.spmm_triton import tile_shape

    group, block_nnz = tile_shape(64)
    lengths = [0, 1, 3 * block_nnz + 5, block_nnz, 2, 40, 0, block_nnz + 1] * 3
    rows = [r for r, n in enumerate(lengths) for _ in range(n)]
    cols = [c for n in lengths for c in range(n)]
    A = small_plan(CSR.from_coo(rows, cols, (len(lengths), 60)), seg=45, group=2)  # the 53-long rows are hubs
    dense = A.to_dense()
    X = torch.randn(60, 64, dtype=torch.float64)
    for backend in ("triton_tile", "triton"):
        torch.testing.assert_close(spmm(A, X.to(DEVICE), backend=backend).cpu(), dense @ X)


def test_width_above_512_is_refused():
    A, _ = random_csr(4, 4, 0.5, seed=0)
    with pytest.raises(ValueError, match="512"):
        spmm(A.to(DEVICE), torch.randn(4, 513, device=DEVICE), backend="triton")


def test_shape_mismatch_is_refused():
    A, _ = random_csr(4, 5, 0.5, seed=0)
    with pytest.raises(ValueError):
        spmm(A.to(DEVICE), torch.randn(4, 3, device=DEVICE), backend="triton")


def test_torch_backend_larger_graph_and_bf16():
    A, dense = random_csr(1500, 700, 0.01, seed=6, hub_row=11, empty_rows=(3, 4))
    X = torch.randn(700, 64, dtype=torch.float64)
    torch.testing.assert_close(spmm(A, X, backend="torch"), dense @ X)
    Xb = X.to(torch.bfloat16)
    Yb = spmm(A, Xb, backend="torch")
    assert Yb.dtype == torch.bfloat16
    torch.testing.assert_close(Yb.double(), dense @ Xb.double(), rtol=2e-2, atol=2e-2)


def test_unknown_backend_and_unavailable_torch_sparse():
    from hellm_kernels.spmm import torch_sparse_available

    A, _ = random_csr(4, 4, 0.5, seed=0)
    with pytest.raises(ValueError, match="unknown SpMM backend"):
        spmm(A, torch.randn(4, 2), backend="cusparse")
    if not torch_sparse_available():
        with pytest.raises(RuntimeError, match="torch_sparse"):
            spmm(A, torch.randn(4, 2), backend="torch_sparse")


@pytest.mark.parametrize("d", [64, 65, 128])
def test_bf16_features_fp32_accumulation(d):
    """bf16 X and output, fp32 accumulation, fp32 running sum: within bf16 rounding of the exact product.
    (The kernel converts each bf16 load to fp32 before any arithmetic, so the interpreter runs it too.)"""
    n, m = (300, 200) if DEVICE.type == "cuda" else (40, 30)
    A, dense = random_csr(n, m, 0.1, seed=d, hub_row=3, empty_rows=(7,))
    A = small_plan(A, seg=8, group=4)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(m, d, generator=g).to(torch.bfloat16)
    rs, cs = torch.rand(n, generator=g), torch.rand(m, generator=g)
    ref = reference(dense, X, rs, cs)
    for backend in ("triton", "triton_tile"):
        total = torch.zeros(n, d, device=DEVICE)
        Y = spmm(A, X.to(DEVICE), row_scale=rs.to(DEVICE), col_scale=cs.to(DEVICE), layer_sum=total,
                 backend=backend)
        assert Y.dtype == torch.bfloat16
        torch.testing.assert_close(Y.cpu().double(), ref, rtol=1e-2, atol=1e-2)  # the output's bf16 rounding
        torch.testing.assert_close(total.cpu().double(), ref, rtol=1e-5, atol=1e-5)  # fp32 accumulation
