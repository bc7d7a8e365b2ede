"""bf16 on the CPU where torch allows it (issue 13, requirement 3): the GPU path's reduced precision, exercised
without a GPU.

- HeLLM (tiny LLaMA, LoRA, graph prefix; linear and tied item heads) forward + loss + backward under
  ``torch.autocast("cpu", dtype=torch.bfloat16)``: finite, fp32 logits and gradients, within bf16 tolerance
  of the fp32 pass; the evaluator's scores (user vectors ``.float()``, ``item_scoring()``, ``score_chunks``)
  are fp32 and exact in fp32 whatever precision the model ran in.
- The graph stage: MMHCL under CPU autocast (the kernels keep X's dtype: the propagation is not cast down,
  and MKL's CSR product — which has no bf16 kernel — is not handed bf16) and MMHCL converted to bf16 end to
  end (bf16 tables, fp32 accumulation inside the kernels), against fp32; the kernels' U2U / LightGCN
  propagation in bf16 against fp32.

Tolerances: bf16 keeps 8 significant bits (relative rounding 2⁻⁹ ≈ 2e-3 per operation); a few layers of
matmuls and norms accumulate it to ~1 % of the output's scale, so outputs are compared as
max |bf16 − fp32| ≤ 3 % of max |fp32| and losses within 1 % — wide enough for rounding, far below what a
dtype bug (a dropped term, a wrong cast of the scale vectors, a bf16 accumulation over a hub row) costs.
"""
import pytest
import torch

from hellm_ds.eval.ranking import score_chunks
from tests.llm.common import ROWS, batch, model

BF16_REL = 3e-2


def rel_max(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("head", ["linear", "tied"])
def test_hellm_forward_loss_backward_under_cpu_bf16_autocast(head):
    m = model(item_head=head)  # eval mode (no dropout: the two passes see the same network), gradients on
    b = batch(ROWS, targets=[1, 2, 3, 4])
    ref_logits = m(b)
    ref_loss = torch.nn.functional.cross_entropy(ref_logits, b["targets"])
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(b)
        loss = m.loss(b)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32  # the model's output contract
    assert torch.isfinite(loss) and torch.isfinite(logits[:, 1:]).all() and torch.isneginf(logits[:, 0]).all()
    assert rel_max(logits[:, 1:], ref_logits[:, 1:]) <= BF16_REL
    assert abs(loss.item() - ref_loss.item()) <= 1e-2 * ref_loss.item()
    loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and grads
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())  # fp32 master grads
    flat, ref_flat = (torch.cat([d[n].flatten() for n in sorted(d)]) for d in (grads, ref_grads))
    assert torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0) > 0.99


def test_ranking_scores_are_fp32_after_a_bf16_forward():
    """What the evaluator ranks with: ``user_vectors(batch).float()`` (here from a bf16-autocast forward) and
    ``item_scoring()``; its item loop (``score_chunks``, outside any autocast region like the evaluator)
    scores in fp32, exactly u · Wᵀ + b to fp32 rounding."""
    m = model(item_head="tied")
    b = batch(ROWS)
    with torch.no_grad():
        u_ref = m.user_vectors(b).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            u = m.user_vectors(b).float()
            W, bias = m.item_scoring()
    assert u.dtype == W.dtype == bias.dtype == torch.float32
    assert rel_max(u, u_ref) <= BF16_REL
    chunks = list(score_chunks(u, W, bias, chunk=7))
    assert all(s.dtype == torch.float32 for _, s in chunks)
    scores = torch.cat([s for _, s in chunks], 1)
    exact = u.double() @ W[1:].double().T + bias[1:].double()
    torch.testing.assert_close(scores.double(), exact, rtol=1e-5, atol=1e-5)


def _graphs():
    from hellm_ds.graph.build import Graphs
    from tests.conftest import random_csr

    R, _ = random_csr(40, 25, 0.15, seed=0, hub_row=3, empty_rows=(7,))
    H, _ = random_csr(25, 12, 0.3, seed=1)
    return Graphs(R, R.transpose(), H, H.transpose(), ("text",), {})


def test_mmhcl_under_cpu_bf16_autocast_and_in_bf16_end_to_end():
    from hellm_ds.pretrain.mmhcl import MMHCL, MMHCLConfig

    torch.manual_seed(0)
    m = MMHCL(_graphs(), MMHCLConfig(dim=16), backend="torch")
    users, pos, neg = torch.arange(8), torch.arange(8), torch.arange(8, 16)
    with torch.no_grad():
        z_ref = m()
    ref = m.loss(users, pos, neg)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # was: MKL "addmm_out_sparse_csr_impl_mkl" not for bf16
        with torch.no_grad():
            z = m()
        terms = m.loss(users, pos, neg)
    for k in z_ref:  # the propagation keeps the tables' dtype: not cast down by autocast
        assert z[k].dtype == torch.float32 and torch.equal(z[k], z_ref[k]), k
    for k, v in ref.items():
        assert torch.isfinite(terms[k]) and abs(terms[k].item() - v.item()) <= 1e-2 * abs(v.item()) + 1e-4, k
    terms["loss"].backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in m.parameters())

    mb = MMHCL(_graphs(), MMHCLConfig(dim=16), backend="torch")  # bf16 tables end to end; the kernels
    mb.load_state_dict(m.state_dict())  # accumulate in fp32
    mb.to(torch.bfloat16)
    with torch.no_grad():
        zb = mb()
    for k in z_ref:
        assert zb[k].dtype == torch.bfloat16 and rel_max(zb[k], z_ref[k]) <= BF16_REL, k
    lb = mb.loss(users, pos, neg)
    assert lb["loss"].dtype == torch.bfloat16 and abs(lb["loss"].item() - ref["loss"].item()) <= 2e-2 * ref["loss"].item()
    lb["loss"].backward()
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in mb.parameters())


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_kernel_propagation_bf16_against_fp32(backend):
    from hellm_ds.graph.operators import bipartite_operator, user_hypergraph
    from hellm_kernels import lightgcn_propagate, propagate
    from tests.conftest import random_csr

    R, _ = random_csr(40, 25, 0.15, seed=2, hub_row=5, empty_rows=(9,))
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 16, generator=g)
    op = user_hypergraph(R)
    Xb = X.to(torch.bfloat16).requires_grad_()
    Y = propagate(op, Xb, 2, "sum", backend=backend)
    assert Y.dtype == torch.bfloat16
    assert rel_max(Y, propagate(op, X, 2, "sum", backend=backend)) <= BF16_REL
    Y.float().sum().backward()
    assert Xb.grad.dtype == torch.bfloat16 and torch.isfinite(Xb.grad).all()

    ui = bipartite_operator(R)
    Eu, Ei = torch.randn(40, 16, generator=g), torch.randn(25, 16, generator=g)
    ub, ib = lightgcn_propagate(ui, Eu.bfloat16(), Ei.bfloat16(), 2, backend=backend)
    uf, if_ = lightgcn_propagate(ui, Eu, Ei, 2, backend=backend)
    assert ub.dtype == ib.dtype == torch.bfloat16
    assert rel_max(ub, uf) <= BF16_REL and rel_max(ib, if_) <= BF16_REL
