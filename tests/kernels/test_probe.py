"""Kernel choice that verifies itself (issue 13, requirement 1): ``backend="auto"`` probes its candidates on
the real matrix — checked against torch CSR, timed, fastest correct kept — through the same code path on
CPU (``probe.PROBE_ON_CPU``, Triton interpreted) as on a GPU. Injected kernels: a wrong one (faster than
the Triton candidates, still rejected), a failing one, a slow one (loses); the choice is cached; a forced
Triton backend that disagrees fails loudly."""
import importlib
import json
import time

import pytest
import torch

from hellm_kernels import probe
from hellm_kernels import KernelMismatchError, KernelProbeWarning, kernel_choices, reset_kernel_choices
from hellm_kernels.spmm import spmm, spmm_torch
from tests.conftest import DEVICE, random_csr, require

spmm_mod = importlib.import_module("hellm_kernels.spmm")  # the module (the package's ``spmm`` is the function)

# a declared test dependency: missing, the module fails to collect (CI goes red) instead of skipping
triton = require("triton", "test", "pip install -e .[test] (no GPU needed: it runs interpreted on CPU)")
from hellm_kernels.spmm_triton import make_plan  # noqa: E402


@pytest.fixture
def probing(monkeypatch):
    """Probe CPU tensors too (the GPU path), few timed runs; a clean choice cache before and after."""
    monkeypatch.setattr(probe, "PROBE_ON_CPU", True)
    monkeypatch.setattr(probe, "WARMUP", 0)
    monkeypatch.setattr(probe, "RUNS", 2)
    monkeypatch.setattr(spmm_mod, "IMPLS", dict(spmm_mod.IMPLS))  # injected kernels vanish afterwards
    monkeypatch.setattr(spmm_mod, "AUTO_CANDIDATES", None)
    reset_kernel_choices()
    yield spmm_mod.IMPLS
    reset_kernel_choices()


def graph(d=5, seed=0):
    """A tiny CSR (empty rows, a hub row split into segments), an odd width, operands on DEVICE."""
    A, dense = random_csr(13, 11, 0.3, seed=seed, hub_row=4, empty_rows=(0, 7))
    A = A.to(DEVICE)
    A._cache["triton_plan"] = make_plan(A, seg=4, group=2)
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(11, d, generator=g, dtype=torch.float64)
    rs = torch.rand(13, generator=g, dtype=torch.float64) + 0.5
    return A, dense, X, rs


def reference(dense, X, rs=None):
    Y = dense @ X.double()
    return Y if rs is None else Y * rs.double()[:, None]


def scaled(factor):
    """A wrong kernel: the torch result times ``factor`` (fast: it would win the timing)."""
    def fn(A, X, rs=None, cs=None, diag=None, Z=None, layer_sum=None, out=None):
        Y = spmm_torch(A, X, rs, cs, diag, Z) * factor
        if layer_sum is not None:
            layer_sum.add_(Y.to(layer_sum.dtype))
        return Y
    return fn


def drops_row(row):
    def fn(A, X, rs=None, cs=None, diag=None, Z=None, layer_sum=None, out=None):
        Y = spmm_torch(A, X, rs, cs, diag, Z).clone()
        Y[row] = 0
        if layer_sum is not None:
            layer_sum.add_(Y.to(layer_sum.dtype))
        return Y
    return fn


def only(key_op="spmm"):
    choices = [c for c in kernel_choices() if c["op"] == key_op]
    assert len(choices) == 1, choices
    return choices[0]


def test_auto_probes_triton_and_torch_and_uses_a_correct_one(probing):
    A, dense, X, rs = graph()
    X32, rs32 = X.float().to(DEVICE), rs.float().to(DEVICE)
    total = torch.ones(13, 5, device=DEVICE)
    Y = spmm(A, X32, row_scale=rs32, layer_sum=total)
    ref = reference(dense, X, rs)
    torch.testing.assert_close(Y.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total.cpu().double(), ref + 1, rtol=1e-5, atol=1e-5)  # added once, not per probe
    c = only()
    assert c["mode"] == "probed" and c["epilogue"] == "rs+sum"
    assert (c["n_rows"], c["n_cols"], c["nnz"], c["dtype"], c["d"]) == (13, 11, A.nnz, "float32", 5)
    assert {x["name"] for x in c["candidates"]} >= {"triton", "triton_tile", "torch"}
    assert all(x["status"] == "correct" and x["ms"] > 0 and x["max_error"] <= 1e-4 for x in c["candidates"])
    fastest = min(c["candidates"], key=lambda x: x["ms"])["name"]
    assert c["chosen"] == fastest and fastest in c["reason"]


@pytest.mark.parametrize("wrong", [scaled(1.01), drops_row(4)], ids=["times_1.01", "drops_hub_row"])
def test_a_wrong_kernel_is_rejected_and_reported_even_when_fastest(probing, wrong):
    probing["wrong"] = wrong
    spmm_mod.AUTO_CANDIDATES = ("wrong", "triton")  # the wrong one is the faster by far under the interpreter
    A, dense, X, rs = graph()
    with pytest.warns(KernelProbeWarning, match="'wrong' is not used for spmm.*wrong"):
        Y = spmm(A, X.float().to(DEVICE), row_scale=rs.float().to(DEVICE))
    torch.testing.assert_close(Y.cpu().double(), reference(dense, X, rs), rtol=1e-5, atol=1e-5)
    c = only()
    status = {x["name"]: x for x in c["candidates"]}
    assert c["chosen"] == "triton" and status["wrong"]["status"] == "wrong"
    assert status["wrong"]["max_error"] > 1e-4 and "tolerance" in status["wrong"]["detail"]
    assert "rejected: wrong wrong" in c["reason"]


def test_a_kernel_that_raises_is_rejected_and_reported(probing):
    def broken(*args):
        raise RuntimeError("simulated compile failure\n  at line 3: unsupported layout")

    probing["broken"] = broken
    spmm_mod.AUTO_CANDIDATES = ("broken", "torch")
    A, dense, X, _ = graph()
    with pytest.warns(KernelProbeWarning, match="'broken'.*error — RuntimeError: .*unsupported layout"):
        Y = spmm(A, X.to(DEVICE))
    torch.testing.assert_close(Y.cpu(), dense @ X)
    c = only()
    assert c["chosen"] == "torch"
    assert [x["status"] for x in c["candidates"]] == ["error", "correct"]


def test_the_warning_is_given_once(probing):
    probing["wrong"] = scaled(2.0)
    spmm_mod.AUTO_CANDIDATES = ("wrong", "torch")
    A, _, X, _ = graph()
    with pytest.warns(KernelProbeWarning):
        spmm(A, X.to(DEVICE))
    B, _, X2, _ = graph(d=3, seed=1)  # another key: probed again, rejected again, not reported again
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelProbeWarning)
        spmm(B, X2.to(DEVICE))
    assert [c["chosen"] for c in kernel_choices()] == ["torch", "torch"]


def test_a_slow_kernel_loses(probing):
    def slow(*args):
        time.sleep(0.03)
        return spmm_torch(*args)

    probing["slow"] = slow
    spmm_mod.AUTO_CANDIDATES = ("slow", "torch")
    A, dense, X, _ = graph()
    spmm(A, X.to(DEVICE))
    c = only()
    ms = {x["name"]: x["ms"] for x in c["candidates"]}
    assert c["chosen"] == "torch" and ms["slow"] >= 30 > ms["torch"], c


def test_a_kernel_that_fails_while_timed_is_not_used(probing):
    calls = []

    def flaky(*args):  # correct on the checked run, then out of memory
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return spmm_torch(*args)

    probing["flaky"] = flaky
    probing["slow"] = lambda *args: (time.sleep(0.01), spmm_torch(*args))[1]
    spmm_mod.AUTO_CANDIDATES = ("flaky", "slow")
    A, dense, X, _ = graph()
    with pytest.warns(KernelProbeWarning, match="'flaky'.*error — while timing: RuntimeError: CUDA out of memory"):
        torch.testing.assert_close(spmm(A, X.to(DEVICE)).cpu(), dense @ X)
    c = only()
    assert c["chosen"] == "slow" and [x["status"] for x in c["candidates"]] == ["error", "correct"]


def test_the_choice_is_cached_per_key(probing):
    calls = []

    def counted(*args):
        calls.append(1)
        time.sleep(0.01)  # correct but slow: never chosen, so only the probe calls it
        return spmm_torch(*args)

    probing["counted"] = counted
    spmm_mod.AUTO_CANDIDATES = ("counted", "torch")
    A, dense, X, _ = graph()
    X = X.to(DEVICE)
    spmm(A, X)
    assert len(calls) == 1 + probe.WARMUP + probe.RUNS  # the check, then the timed runs
    for _ in range(3):
        torch.testing.assert_close(spmm(A, X).cpu(), dense @ X.cpu())
    assert len(calls) == 1 + probe.WARMUP + probe.RUNS and len(kernel_choices()) == 1
    spmm(A, X[:, :3])  # another width: another key, probed
    assert len(calls) == 2 * (1 + probe.WARMUP + probe.RUNS) and len(kernel_choices()) == 2
    reset_kernel_choices()
    spmm(A, X)
    assert len(calls) == 3 * (1 + probe.WARMUP + probe.RUNS)


def test_kernel_choices_is_json(probing):
    probing["wrong"] = scaled(1.5)
    probing["bad_shape"] = lambda *args: spmm_torch(*args)[:, :1]
    spmm_mod.AUTO_CANDIDATES = ("wrong", "bad_shape", "torch")
    A, _, X, rs = graph()
    with pytest.warns(KernelProbeWarning) as caught:
        spmm(A, X.to(DEVICE), row_scale=rs.to(DEVICE))
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and "'bad_shape'" in messages[0] and "'wrong'" in messages[1]
    assert "output 0 is [13, 1], expected shape [13, 5]" in messages[0]
    spmm(A, X.to(DEVICE), backend="torch")
    back = json.loads(json.dumps(kernel_choices(), allow_nan=False))  # strict JSON
    assert back == kernel_choices() and len(back) == 2
    assert set(back[0]) == {"op", "n_rows", "n_cols", "nnz", "dtype", "d", "device", "epilogue", "mode", "chosen",
                            "reason", "tolerance", "candidates"}
    assert set(back[0]["candidates"][0]) == {"name", "status", "ms", "max_error", "detail"}
    assert [c["mode"] for c in back] == ["probed", "forced"]
    assert [(x["status"], x["max_error"] is None) for x in back[0]["candidates"]] == [
        ("wrong", False), ("wrong", True), ("correct", False)]


def test_no_candidate_agreeing_raises(probing):
    probing["wrong"] = scaled(1.5)
    spmm_mod.AUTO_CANDIDATES = ("wrong",)
    A, _, X, _ = graph()
    with pytest.warns(KernelProbeWarning), pytest.raises(KernelMismatchError, match="no kernel agrees"):
        spmm(A, X.to(DEVICE))


@pytest.mark.parametrize("wrong", [scaled(1.01), drops_row(4)], ids=["times_1.01", "drops_hub_row"])
def test_forced_triton_that_disagrees_fails_loudly(probing, wrong):
    A, dense, X, rs = graph()
    X32 = X.float().to(DEVICE)
    torch.testing.assert_close(spmm(A, X32, backend="triton").cpu().double(), dense @ X, rtol=1e-5, atol=1e-5)
    assert only()["mode"] == "forced" and only()["chosen"] == "triton"
    probing["triton"] = wrong  # the same key is verified already; a new key is verified on first use
    for _ in range(2):  # every call with an unverified key raises: a mismatch is never cached as verified
        with pytest.raises(KernelMismatchError, match="backend 'triton' was forced but its spmm output disagrees"):
            spmm(A, X32, row_scale=rs.float().to(DEVICE), backend="triton")


def test_bf16_probe_rejects_a_dropped_row_and_accepts_the_triton_rounding(probing):
    probing["wrong"] = drops_row(4)
    spmm_mod.AUTO_CANDIDATES = ("wrong", "triton", "torch")
    A, dense, X, rs = graph(d=9)
    Xb = X.to(torch.bfloat16)
    with pytest.warns(KernelProbeWarning):
        Y = spmm(A, Xb.to(DEVICE), row_scale=rs.float().to(DEVICE))
    c = only()
    status = {x["name"]: x["status"] for x in c["candidates"]}
    assert status == {"wrong": "wrong", "triton": "correct", "torch": "correct"} and c["tolerance"] == 1e-2
    assert Y.dtype == torch.bfloat16
    torch.testing.assert_close(Y.cpu().double(), reference(dense, Xb, rs), rtol=1e-2, atol=1e-2)


def test_propagation_through_the_probe(probing):
    """The graph stage's path (two fused SpMMs per layer, diagonal term, running sum; backward through the
    transposes) under ``auto`` with probing: exact results, one probed choice per distinct key."""
    from hellm_ds.graph.operators import user_hypergraph
    from hellm_kernels import propagate

    R, _ = random_csr(12, 9, 0.3, seed=3, hub_row=2, empty_rows=(5,))
    op = user_hypergraph(R).to(DEVICE)
    for M in (op.M, op.MT):
        M._cache["triton_plan"] = make_plan(M, seg=4, group=2)
    X = torch.randn(12, 6, dtype=torch.float64, device=DEVICE, requires_grad=True)
    Y = propagate(op, X, 2, "sum")
    P = op.to_dense()
    Xd = X.detach().cpu()
    torch.testing.assert_close(Y.detach().cpu(), Xd + P @ Xd + P @ P @ Xd)
    Y.sum().backward()
    ones = torch.ones(12, 6, dtype=torch.float64)
    torch.testing.assert_close(X.grad.cpu(), ones + P.T @ ones + P.T @ P.T @ ones)
    choices = kernel_choices()
    assert choices and all(c["mode"] == "probed" and c["dtype"] == "float64" for c in choices)
    assert all(x["status"] == "correct" for c in choices for x in c["candidates"])
    assert len({(c["n_rows"], c["n_cols"], c["epilogue"]) for c in choices}) == len(choices)


def test_auto_on_cpu_without_the_switch_is_torch_and_recorded(monkeypatch):
    if DEVICE.type == "cuda":
        pytest.skip("CPU behaviour")
    monkeypatch.setattr(probe, "PROBE_ON_CPU", False)
    monkeypatch.delenv("HELLM_PROBE_ON_CPU", raising=False)
    reset_kernel_choices()
    A, dense, X, _ = graph()
    torch.testing.assert_close(spmm(A, X), dense @ X)
    c = only()
    assert c["mode"] == "default" and c["chosen"] == "torch" and "HELLM_PROBE_ON_CPU" in c["reason"]
    reset_kernel_choices()


def test_sample_columns_cover_the_width():
    assert probe.sample_columns(5).tolist() == [0, 1, 2, 3, 4]
    cols = probe.sample_columns(300)
    assert cols[0] == 0 and cols[-1] == 299 and len(cols) == probe.COLUMNS
    assert {int(c) // 128 for c in cols} == {0, 1, 2}  # every Triton column block of a wide X


def test_choose_is_generic_for_other_operators():
    """``probe.choose`` takes plain callables: another operator (here a dense stand-in) gets the same
    checking, timing and caching, keyed by its own op name."""
    reset_kernel_choices()
    try:
        A, dense, X, _ = graph()
        ref = lambda cols: dense @ X[:, cols]  # noqa: E731  (magnitude bound defaults to |ref|)
        with pytest.warns(KernelProbeWarning, match=r"'off' is not used for dense_mm .* > tolerance 1e-10"):
            c = probe.choose("dense_mm", A, X, {"good": lambda x: dense @ x, "off": lambda x: dense @ x + 1e-3},
                             ref, warmup=0, runs=1)
        assert c.chosen == "good" and [r.status for r in c.candidates] == ["correct", "wrong"]
        assert probe.choose("dense_mm", A, X, {}, ref) is c  # cached: nothing run the second time
        assert only("dense_mm")["mode"] == "probed"
    finally:
        reset_kernel_choices()
