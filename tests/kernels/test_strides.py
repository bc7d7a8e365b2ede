"""Strides at the public kernel boundary (issue 13, requirement 3): every tensor argument of ``spmm`` (and of
``spmm_triton``) with a layout the kernels do not assume — a transposed or strided view — is either made
contiguous (inputs: the result still equals the float64 dense product) or refused with a
``KernelUsageError`` naming the argument and its stride (outputs written in place: never silently copied).
Each backend: the Triton kernels address operands as base + row·stride + column, the torch ones do not care,
and ``auto`` may pick either, so the rules are the same for all."""
import pytest
import torch

from hellm_kernels import KernelUsageError
from hellm_kernels.csr import CSR
from hellm_kernels.spmm import spmm
from tests.conftest import DEVICE, random_csr, require

triton = require("triton", "test", "pip install -e .[test] (no GPU needed: it runs interpreted on CPU)")
from hellm_kernels.spmm_triton import make_plan, spmm_triton  # noqa: E402

BACKENDS = ("triton", "triton_tile", "torch")
N, M, D = 9, 7, 3


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view: every other element of a twice-as-long 1-D tensor, or the
    transpose of the transposed copy for a 2-D one (inner stride ≠ 1)."""
    if t.dim() == 1:
        big = torch.zeros(2 * t.numel(), dtype=t.dtype, device=t.device)
        big[::2] = t
        view = big[::2]
    else:
        view = t.T.contiguous().T
    assert not view.is_contiguous() and torch.equal(view, t)
    return view


def setup(values=False, seed=0):
    A, dense = random_csr(N, M, 0.4, seed=seed, hub_row=2, empty_rows=(5,), values=values)
    A = A.to(DEVICE)
    A._cache["triton_plan"] = make_plan(A, seg=3, group=2)
    g = torch.Generator().manual_seed(seed)
    ops = dict(X=torch.randn(M, D, generator=g, dtype=torch.float64),
               row_scale=torch.rand(N, generator=g, dtype=torch.float64) + 0.5,
               col_scale=torch.rand(M, generator=g, dtype=torch.float64) + 0.5,
               diag=torch.rand(N, generator=g, dtype=torch.float64),
               Z=torch.randn(N, D, generator=g, dtype=torch.float64))
    ref = ops["row_scale"][:, None] * (dense @ (ops["col_scale"][:, None] * ops["X"])) - ops["diag"][:, None] * ops["Z"]
    return A, {k: v.to(DEVICE) for k, v in ops.items()}, ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg", ["X", "Z", "row_scale", "col_scale", "diag"])
def test_strided_input_is_read_correctly(arg, backend):
    A, ops, ref = setup()
    ops[arg] = strided(ops[arg])
    X = ops.pop("X")
    total = torch.zeros(N, D, dtype=torch.float64, device=DEVICE)
    Y = spmm(A, X, **ops, layer_sum=total, backend=backend)
    torch.testing.assert_close(Y.cpu(), ref)
    torch.testing.assert_close(total.cpu(), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_slice_of_a_wider_x_is_read_in_place(backend):
    """Unit inner stride, row stride > width: the kernels read it as it is."""
    A, ops, ref = setup()
    wide = torch.zeros(M, D + 5, dtype=torch.float64, device=DEVICE)
    wide[:, 2:2 + D] = ops.pop("X")
    X = wide[:, 2:2 + D]
    assert X.stride() == (D + 5, 1)
    torch.testing.assert_close(spmm(A, X, **ops, backend=backend).cpu(), ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arg", ["indptr", "indices", "values"])
def test_strided_csr_arrays_are_made_contiguous(arg, backend):
    A, ops, ref = setup(values=True)
    parts = dict(indptr=A.indptr, indices=A.indices, values=A.values)
    parts[arg] = strided(parts[arg])
    B = CSR(parts["indptr"], parts["indices"], A.shape, parts["values"])
    assert B.indptr.is_contiguous() and B.indices.is_contiguous() and B.values.is_contiguous()
    B._cache["triton_plan"] = make_plan(B, seg=3, group=2)
    X = ops.pop("X")
    torch.testing.assert_close(spmm(B, X, **ops, backend=backend).cpu(), ref)


@pytest.mark.parametrize("backend", BACKENDS + ("auto",))
@pytest.mark.parametrize("arg", ["out", "layer_sum"])
def test_strided_output_is_refused_with_its_name(arg, backend):
    A, ops, _ = setup()
    X = ops.pop("X")
    target = strided(torch.zeros(N, D, dtype=torch.float64, device=DEVICE))
    with pytest.raises(KernelUsageError, match=rf"^{arg} is written in place .* stride \(1, {N}\)"):
        spmm(A, X, **ops, backend=backend, **{arg: target})
    assert torch.equal(target, torch.zeros_like(target))  # nothing written


@pytest.mark.parametrize("arg", ["out", "layer_sum"])
def test_overlapping_output_rows_are_refused(arg):
    A, ops, _ = setup()
    X = ops.pop("X")
    target = torch.zeros(N * D, dtype=torch.float64, device=DEVICE).as_strided((N, D), (1, 1))
    with pytest.raises(KernelUsageError, match=rf"^{arg} is written in place"):
        spmm(A, X, **ops, backend="torch", **{arg: target})


def test_spmm_triton_checks_its_own_boundary():
    """``spmm_triton`` is public too: the same rules without going through ``spmm``."""
    A, ops, ref = setup()
    X = strided(ops.pop("X"))
    rs = strided(ops["row_scale"])
    Y = spmm_triton(A, X, rs, ops["col_scale"], ops["diag"], strided(ops["Z"]))
    torch.testing.assert_close(Y.cpu(), ref)
    with pytest.raises(KernelUsageError, match="^out is written in place"):
        spmm_triton(A, X, out=strided(torch.zeros(N, D, dtype=torch.float64, device=DEVICE)))


@pytest.mark.parametrize("arg,shape,message", [
    ("row_scale", (N + 1,), r"row_scale must have shape \[9\]"),
    ("col_scale", (M - 1,), r"col_scale must have shape \[7\]"),
    ("Z", (N, D + 1), r"Z must have shape \[9, 3\]"),
    ("out", (N - 1, D), r"out must have shape \[9, 3\]"),
])
def test_wrong_shapes_are_named(arg, shape, message):
    A, ops, _ = setup()
    X = ops.pop("X")
    kw = {k: v for k, v in ops.items()}
    kw[arg] = torch.zeros(shape, dtype=torch.float64, device=DEVICE)
    with pytest.raises(KernelUsageError, match=message):
        spmm(A, X, **kw, backend="torch")
