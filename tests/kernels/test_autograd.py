"""Autograd through the sparse products: gradcheck, the adjoint identity, determinism, both backends; on
``DEVICE`` (the GPU when there is one)."""
import pytest
import torch

from hellm_ds.graph.operators import bipartite_operator, item_hypergraph, user_hypergraph
from hellm_kernels import lightgcn_propagate, propagate, sparse_mm
from hellm_kernels import torch_sparse_available
from tests.conftest import DEVICE, random_csr

BACKENDS = ["torch", "triton", "triton_tile", pytest.param("torch_sparse", marks=pytest.mark.skipif(
    not torch_sparse_available(), reason="optional torch_sparse backend not installed"))]


def _triton_small(*mats):
    """The matrices on DEVICE, with small launch plans (hub segments on tiny graphs)."""
    from hellm_kernels.spmm_triton import make_plan

    mats = [A.to(DEVICE) for A in mats]
    for A in mats:
        A._cache["triton_plan"] = make_plan(A, seg=4, group=2)
    return mats


@pytest.fixture
def graph():
    R, dense = random_csr(14, 11, 0.3, seed=2, hub_row=3, empty_rows=(6,))
    R, RT = _triton_small(R, R.transpose())
    return R, RT, dense


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_mm_gradcheck_x_and_values(backend):
    A, _ = random_csr(9, 7, 0.4, seed=1, hub_row=2, values=True)
    A, AT = _triton_small(A, A.transpose())
    g = torch.Generator().manual_seed(0)
    rs, cs = (torch.rand(n, generator=g).to(DEVICE) + 0.5 for n in (9, 7))
    X = torch.randn(7, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    v = A.values.clone().requires_grad_()
    f = lambda x, vals: sparse_mm(A, x, AT, rs, cs, values=vals, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (X, v), fast_mode=FAST[backend])


# The Triton interpreter runs each launch in numpy: its gradchecks use fast mode (one random projection of
# the Jacobian, exact for these linear maps) and the narrowest input; the full Jacobian is checked on torch.
FAST = {"torch": False, "triton": True, "triton_tile": True, "torch_sparse": False}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combine", ["last", "sum", "mean"])
def test_propagate_gradcheck_u2u_and_i2i(graph, backend, combine):
    R, RT, _ = graph
    for op, n in ((user_hypergraph(R, RT), 14), (item_hypergraph(R, RT), 14)):
        X = torch.randn(n, 1 if backend.startswith("triton") else 3, dtype=torch.float64, device=DEVICE,
                        requires_grad=True)
        f = lambda x: propagate(op, x, 2, combine, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(f, (X,), fast_mode=FAST[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightgcn_gradcheck_and_reference(graph, backend):
    R, RT, _ = graph
    op = bipartite_operator(R, RT)
    Eu = torch.randn(14, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    Ei = torch.randn(11, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    f = lambda u, i: lightgcn_propagate(op, u, i, 2, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(f, (Eu, Ei), fast_mode=FAST[backend])
    A = op.to_dense()
    E = torch.cat([Eu, Ei]).detach().cpu()
    ref = (E + A @ E + A @ A @ E) / 3
    u, i = lightgcn_propagate(op, Eu.detach(), Ei.detach(), 2, backend=backend)
    torch.testing.assert_close(torch.cat([u, i]).cpu(), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adjoint_identity(graph, backend):
    """⟨P X, G⟩ = ⟨X, Pᵀ G⟩ for the two-stage operators and their transposes."""
    R, RT, _ = graph
    g = torch.Generator().manual_seed(1)
    for op in (user_hypergraph(R, RT), item_hypergraph(R, RT)):
        X = torch.randn(14, 6, generator=g, dtype=torch.float64).to(DEVICE)
        G = torch.randn(14, 6, generator=g, dtype=torch.float64).to(DEVICE)
        lhs = (propagate(op, X, 1, backend=backend) * G).sum()
        rhs = (X * propagate(op.transpose(), G, 1, backend=backend)).sum()
        torch.testing.assert_close(lhs, rhs)
        torch.testing.assert_close(op.transpose().to_dense(), op.to_dense().T)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_backward_bit_deterministic(graph, backend):
    R, RT, _ = graph
    op = user_hypergraph(R, RT)
    outs = []
    for _ in range(2):
        X = torch.linspace(-1, 1, 14 * 8, device=DEVICE).reshape(14, 8).requires_grad_()
        Y = propagate(op, X, 3, "mean", backend=backend)
        (Y * torch.arange(8.0, device=DEVICE)).sum().backward()
        outs.append((Y.detach(), X.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_backends_agree_at_larger_size():
    """Every available backend (the Triton ones interpreted on CPU, torch_sparse when installed), on default
    launch plans (row 0 is a hub split into segments) and float32 inputs: forward and gradient of a 2-layer
    U2U propagation agree with each other and with a float64 dense U2U built from the dense R itself."""
    from hellm_kernels.spmm_triton import make_plan

    backends = ["torch", "triton", "triton_tile"] + (["torch_sparse"] if torch_sparse_available() else [])
    R, dense = random_csr(120, 300, 0.03, seed=9, hub_row=0, empty_rows=(5, 6))
    assert make_plan(R).hub_rows.tolist() == [0]  # the default plan splits the hub: that path runs too
    # U2U = rownorm(R Rᵀ − diag(R Rᵀ)), rows without neighbours zero — independently of operators.py
    A = dense @ dense.T
    A -= torch.diag(torch.diag(A))
    deg = A.sum(1, keepdim=True)
    P = torch.where(deg > 0, A / deg.clamp_min(1), 0.0)
    g = torch.Generator().manual_seed(3)
    X = torch.randn(120, 16, generator=g, dtype=torch.float64)
    G = torch.randn(120, 16, generator=g, dtype=torch.float64)
    ref_y, ref_grad = X + P @ X + P @ P @ X, G + P.T @ G + P.T @ P.T @ G

    op = user_hypergraph(R.to(DEVICE))  # fresh CSRs: the Triton backends make their default plans
    got = {}
    for backend in backends:
        x = X.float().to(DEVICE).requires_grad_()
        y = propagate(op, x, 2, "sum", backend=backend)
        y.backward(G.float().to(DEVICE))
        assert y.dtype == torch.float32, backend
        got[backend] = (y.detach().cpu(), x.grad.cpu())
        for name, value, ref in zip(("forward", "gradient"), got[backend], (ref_y, ref_grad)):
            torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, b=backend, n=name: f"{b} {n} vs float64 dense: {m}")
    for i, a in enumerate(backends):
        for b in backends[i + 1:]:
            for k, name in enumerate(("forward", "gradient")):
                torch.testing.assert_close(got[a][k], got[b][k],
                                           msg=lambda m, a=a, b=b, n=name: f"{a} vs {b} {n}: {m}")


def test_bad_arguments():
    R, _ = random_csr(5, 4, 0.5, seed=0)
    op = user_hypergraph(R)
    with pytest.raises(ValueError, match="combine"):
        propagate(op, torch.randn(5, 2), 1, "max")
    with pytest.raises(ValueError, match="rows"):
        propagate(op, torch.randn(4, 2), 1)
