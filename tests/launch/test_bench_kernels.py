"""launch/bench_kernels.py on the CPU with tiny graphs: JSON shape, correctness guard, power-law generator."""
from __future__ import annotations

import json
import math

import pytest
import torch

from hellm_ds.data.synth import SynthConfig, write_synthetic

from tests.conftest import require
from tests.launch.conftest import load_script

pytestmark = pytest.mark.filterwarnings("ignore:Sparse")



@pytest.fixture(scope="module")
def bench():
    yield from load_script("bench_kernels")


@pytest.mark.parametrize("size", [(2_000, 600, 16_000), (500, 200, 3_000), (3_000, 1_000, 30_000)])
def test_power_law_bipartite(bench, size):
    n_users, n_items, nnz = size
    R = bench.power_law_bipartite(n_users, n_items, nnz, seed=3, device="cpu")
    assert R.shape == (n_users, n_items)
    assert abs(R.nnz - nnz) <= 0.1 * nnz
    assert R.values is None and R.indices.dtype == torch.int32 and R.indptr.dtype == torch.int32
    ip = R.indptr.long()
    assert ip[0] == 0 and ip[-1] == R.nnz and bool((ip[1:] >= ip[:-1]).all())
    cols = R.indices.long()
    assert int(cols.min()) >= 0 and int(cols.max()) < n_items
    rows = torch.repeat_interleave(torch.arange(n_users), R.row_nnz())
    keys = rows * n_items + cols
    assert torch.unique(keys).numel() == R.nnz  # no duplicate (u, i) pairs
    assert bool((keys[1:] > keys[:-1]).all())  # row-major, columns sorted within each row
    item_deg = torch.bincount(cols, minlength=n_items).double()
    user_deg = R.row_nnz().double()
    assert item_deg.max() >= 8 * item_deg.mean()  # very skewed item popularity
    assert user_deg.max() >= 5 * user_deg.mean()  # hub users
    # deterministic per seed
    R2 = bench.power_law_bipartite(n_users, n_items, nnz, seed=3, device="cpu")
    assert torch.equal(R.indptr, R2.indptr) and torch.equal(R.indices, R2.indices)


def test_row_normalised(bench):
    R = bench.power_law_bipartite(300, 120, 2_000, seed=1, device="cpu")
    A = bench.row_normalised(R)
    dense = A.to_dense()
    deg = R.row_nnz().double()
    assert torch.allclose(dense.sum(1), (deg > 0).double(), atol=1e-6)


def test_materialise_matches_operator(bench):
    P = bench.project()
    R = bench.power_law_bipartite(200, 80, 1_200, seed=2, device="cpu")
    for op in (P.user_hypergraph(R), P.item_hypergraph(R)):
        M, est = bench.materialise(op, 1e9)
        assert est >= M.nnz
        assert torch.allclose(M.to_dense(), op.to_dense(), atol=1e-5)
    M, est = bench.materialise(P.user_hypergraph(R), 10)
    assert M is None and est > 10


def test_main_tiny_cpu(bench, tmp_path, capsys):
    data = write_synthetic(tmp_path / "data", SynthConfig(users=200, items=60, seed=0))
    out = tmp_path / "bench.json"
    res = bench.main(["--device", "cpu", "--sizes", "tiny", "--dims", "64", "--dtypes", "fp32,bf16",
                      "--repeats", "2", "--warmup", "0", "--data", str(data), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "targets" in printed and "torch_csr" in printed

    doc = json.loads(out.read_text())
    assert res["copy_gbps"] == doc["copy_gbps"]
    for key in ("benchmark", "date", "device", "torch", "triton", "copy_gbps", "results", "summary"):
        assert key in doc
    assert doc["benchmark"] == "kernels" and doc["copy_gbps"] > 0
    recs = doc["results"]
    assert recs and all({"name", "params", "metrics", "status"} <= set(r) for r in recs)
    assert len({r["name"] for r in recs}) == len(recs)

    ok = [r for r in recs if r["status"] == "ok"]
    assert not [r for r in recs if r["status"] in ("error", "oom")], [r["note"] for r in recs]
    graphs = {r["params"]["graph"] for r in recs}
    assert graphs == {"data:data", "powerlaw-2kx600-16k", "powerlaw-500x200-3k"}
    def methods(graph, case, dtype):
        return {r["params"]["method"] for r in ok
                if (r["params"]["graph"], r["params"]["case"], r["params"]["dtype"]) == (graph, case, dtype)}

    for g in graphs:
        for dt in ("fp32", "bf16"):
            assert {"project[torch]", "torch_csr", "torch_coo"} <= methods(g, "spmm", dt), (g, dt)
            assert {"project[torch]", "torch_csr"} <= methods(g, "u2u", dt), (g, dt)
    assert any(r["params"]["case"] == "i2i" for r in ok)  # the synthetic dataset has item modalities
    assert any(r["params"]["method"] == "materialised" for r in ok)
    for r in ok:
        m = r["metrics"]
        assert math.isfinite(m["ms"]) and m["ms"] > 0
        assert m["gbps"] > 0 and m["floor_bytes"] > 0 and m["speedup_vs_cusparse"] > 0
        assert m["correct"] is True and m["max_rel_err"] <= m["tolerance"], r["name"]
    for s in doc["summary"]:
        assert {"graph", "what", "value", "target", "met"} <= set(s)
    assert {s["graph"] for s in doc["summary"]} == graphs


def test_main_triton_interpreted(bench, tmp_path):
    """The Triton code path end to end under the interpreter (CPU only; a few seconds on a tiny graph)."""
    P = bench.project()
    if torch.cuda.is_available():
        pytest.skip("the interpreted Triton path is the CPU-only machine's (a GPU runs the compiled kernels)")
    require("triton", "test", "pip install -e .[test]")  # declared: missing fails, never skips
    assert P.triton_interpreted(), "tests/conftest.py sets TRITON_INTERPRET=1 without CUDA; it was overridden"
    out = tmp_path / "bench.json"
    bench.main(["--device", "cpu", "--sizes", "150x60x600", "--dims", "16", "--dtypes", "fp32", "--repeats", "1",
                "--warmup", "0", "--triton-interpret", "--quiet", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["project_backend"] == "triton"
    for variant in ("project[triton]", "project[triton_tile]"):  # both variants timed, both in the summary
        proj = [r for r in doc["results"] if r["params"]["method"] == variant]
        assert {r["params"]["case"] for r in proj} == {"spmm", "u2u"}
        assert all(r["status"] == "ok" and r["metrics"]["correct"] for r in proj), proj
        assert any(s["what"].startswith(variant) or variant in s["what"] for s in doc["summary"])
