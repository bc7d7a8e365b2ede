"""launch/bench_eval.py on the CPU with a tiny synthetic dataset: JSON shape, the correctness guard, sub-datasets;
the model mode (``--checkpoint``) on a tiny HeLLM export made by the real trainer (two steps)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hellm_ds.data.dataset import load_dataset
from hellm_ds.data.synth import SynthConfig, write_synthetic
from hellm_ds.eval.evaluator import evaluate
from hellm_ds.utils.checkpoint import export_tensors
from tests.launch.conftest import load_script
from tests.train.common import run


@pytest.fixture(scope="module")
def bench():
    yield from load_script("bench_eval")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("bench_eval") / "data", SynthConfig(users=300, items=120, seed=1))


def test_main_tiny_cpu(bench, data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    res = bench.main(["--data", str(data), "--device", "cpu", "--dim", "16", "--batch-size", "64",
                      "--baseline-users", "40", "--out", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "eval" and saved["device_type"] == "cpu"
    for key in ("date", "device", "torch", "threads", "config", "data", "notes", "results", "summary"):
        assert key in saved
    ds = load_dataset(data)
    n_eval = len(ds.split("valid"))
    assert saved["data"]["users"] == ds.n_users and saved["data"]["items"] == ds.n_items
    assert saved["data"]["ranked_users"] == 2 * n_eval and saved["data"]["dim"] == 16
    recs = {r["name"]: r for r in saved["results"]}
    assert set(recs) == {"project", "baseline"}
    for r in recs.values():
        assert r["status"] == "ok" and set(r) == {"name", "params", "metrics", "status", "note"}
        m = r["metrics"]
        assert m["seconds"] > 0 and m["users_per_s"] > 0 and m["peak_mem_mb"] > 0
        assert r["params"]["splits"] == ["valid", "test"] and r["params"]["protocols"] == ["paper", "filtered"]
    assert recs["project"]["metrics"]["users_measured"] == 2 * n_eval
    assert recs["project"]["metrics"]["extrapolated"] is False
    b = recs["baseline"]["metrics"]
    assert b["users_measured"] == 80 and b["extrapolated"] is True
    assert b["seconds"] == pytest.approx(b["seconds_measured"] * 2 * n_eval / 80)
    assert "EXTRAPOLATED" in recs["baseline"]["note"] and "EXTRAPOLATED" in printed
    s = saved["summary"]
    assert s["correct"] is True
    assert s["speedup"] == pytest.approx(b["seconds"] / recs["project"]["metrics"]["seconds"])
    g = s["guard"]
    assert g["users_per_split"] == 40 and g["topk_position_mismatches"] == 0 and g["max_abs_metric_diff"] <= 1e-9
    for split in ("valid", "test"):
        for proto in ("paper", "filtered"):
            p, q = g["project_subset"][split][proto], g["baseline_subset"][split][proto]
            assert set(p) == set(q) | {"mean_ties", "users"} and len(q) == 15 and p["mean_ties"] == 0  # random vectors
            assert all(p[k] == pytest.approx(q[k], abs=1e-9) for k in q)
            assert 0.05 < p["Recall@20"] < 1.0  # the planted vectors make the guard compare real hits...
            assert p["NDCG@10"] < p["Recall@10"]  # ...at varied positions
    assert g["project_subset"]["test"]["filtered"] != g["project_subset"]["test"]["paper"]
    # the reported all-user metrics are the evaluator's on the same vectors
    user, item = bench.random_vectors(ds, 16, 0)
    again = evaluate(ds, "test", lambda bt: user[bt["users"]], item_vectors=item, progress=False)
    assert s["metrics_all_users"]["test"]["paper"]["NDCG@10"] == pytest.approx(again["paper"]["NDCG@10"])
    assert "speed-up" in printed and "guard" in printed and res["summary"]["correct"] is True


def test_guard_fails_loudly(bench, data, tmp_path, monkeypatch, capsys):
    real = bench.baseline_eval

    def off_by_one(*a, **kw):
        metrics, pos = real(*a, **kw)
        pos = {p: [min(r + 1, bench.TOPK) for r in v] for p, v in pos.items()}
        return metrics, pos

    monkeypatch.setattr(bench, "baseline_eval", off_by_one)
    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit, match="disagree"):
        bench.main(["--data", str(data), "--device", "cpu", "--dim", "8", "--baseline-users", "20",
                    "--out", str(out), "--quiet"])
    saved = json.loads(out.read_text())  # written before failing
    assert saved["summary"]["correct"] is False and saved["summary"]["guard"]["topk_position_mismatches"] > 0


def test_subset_dataset_ranks_exactly_those_users(bench, data):
    ds = load_dataset(data)
    users = np.sort(np.random.default_rng(0).choice(ds.split("test").users, 25, replace=False))
    sub = bench.subset_dataset(ds, users)
    assert sub.n_users == 25 and sub.n_items == ds.n_items
    for j, u in enumerate(users):
        assert np.array_equal(sub.history(j), ds.history(u))
    s, t = sub.split("test"), ds.split("test")
    assert np.array_equal(s.targets, t.targets[np.searchsorted(t.users, users)])


def test_graph_emb_file(bench, data, tmp_path):
    ds = load_dataset(data)
    g = torch.Generator().manual_seed(3)
    user = torch.cat([torch.zeros(1, 8), torch.randn(ds.n_users, 8, generator=g)])
    item = torch.cat([torch.zeros(1, 8), torch.randn(ds.n_items, 8, generator=g)])
    path = tmp_path / "graph_embeddings.safetensors"
    export_tensors(path, {"user": user, "item": item, "user_ids": torch.from_numpy(ds.user_ids.copy())},
                   {"stage": "graph"}, ds.fingerprint)
    res = bench.main(["--data", str(data), "--device", "cpu", "--graph-emb", str(path), "--baseline-users", "30",
                      "--out", str(tmp_path / "eval.json"), "--quiet"])
    assert res["data"]["dim"] == 8 and "graph embedding" in res["data"]["vectors"]
    assert res["summary"]["correct"] is True
    want = evaluate(ds, "valid", lambda bt: user[bt["users"] + 1], item_vectors=item, progress=False)
    assert res["summary"]["metrics_all_users"]["valid"]["filtered"]["Recall@10"] == pytest.approx(
        want["filtered"]["Recall@10"])


@pytest.fixture(scope="module")
def export(tables, tmp_path_factory):
    """A tiny fine-tuned HeLLM export (the real trainer, 2 steps, no evaluation) and its dataset."""
    out = tmp_path_factory.mktemp("bench_eval_model") / "run"
    run(tables, out, "--epochs", "1", "--steps-per-epoch", "2", "--skip-eval")
    return out, tables[0]


def test_model_mode_tiny_cpu(bench, export, tmp_path, capsys):
    from hellm_ds.eval.checkpoint import evaluate_checkpoint
    from hellm_ds.exports import run_max_len

    ckpt, data = export
    out = tmp_path / "eval.json"
    res = bench.main(["--checkpoint", str(ckpt), "--data", str(data), "--device", "cpu", "--batch-size", "64",
                      "--baseline-users", "25", "--out", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "eval" and saved["device_type"] == "cpu" and saved["device"]
    ds = load_dataset(data, max_len=run_max_len(ckpt))
    assert saved["config"]["max_len"] == run_max_len(ckpt) == 10  # the run's, read from the export
    n_eval = len(ds.split("valid"))
    assert saved["data"]["ranked_users"] == 2 * n_eval and saved["data"]["dim"] == 64  # tiny LLaMA: H = 64
    assert "fine-tuned HeLLM" in saved["data"]["vectors"]
    m = saved["model"]
    assert m["checkpoint"] == str(ckpt) and m["dtype"] == "float32" and m["parameters"] > 0
    assert m["load_seconds"] > 0
    recs = {r["name"]: r for r in saved["results"]}
    assert set(recs) == {"project", "baseline"}
    for r in recs.values():
        assert r["status"] == "ok" and set(r) == {"name", "params", "metrics", "status", "note"}
        assert r["params"]["mode"] == "model" and r["params"]["dtype"] == "float32"
        mt = r["metrics"]
        assert mt["seconds"] > 0 and mt["users_per_s"] > 0 and mt["ms_per_user"] > 0 and mt["peak_mem_mb"] > 0
    assert recs["project"]["params"]["batch_size"] == 64 and recs["baseline"]["params"]["batch_size"] == 1
    assert recs["project"]["metrics"]["users_measured"] == 2 * n_eval
    b = recs["baseline"]["metrics"]
    assert b["users_measured"] == 50 and b["extrapolated"] is True
    assert b["seconds"] == pytest.approx(b["seconds_measured"] * 2 * n_eval / 50)
    assert "EXTRAPOLATED" in recs["baseline"]["note"] and "batch-1 LLM forward" in recs["baseline"]["note"]
    s = saved["summary"]
    assert s["speedup"] == pytest.approx(b["seconds"] / recs["project"]["metrics"]["seconds"])
    g = s["guard"]
    assert s["correct"] is True and g["tolerance"] == bench.MODEL_TOLERANCE == 1e-5
    assert g["users_per_split"] == 25 and g["topk_position_mismatches"] == 0
    assert g["max_abs_metric_diff"] <= 1e-5 and g["max_abs_target_score_diff"] < 1e-3
    for split in ("valid", "test"):
        for proto in ("paper", "filtered"):
            p, q = g["project_subset"][split][proto], g["baseline_subset"][split][proto]
            assert set(p) == set(q) | {"mean_ties", "users"} and len(q) == 15
            assert all(p[k] == pytest.approx(q[k], abs=1e-5) for k in q)
    assert any(g["project_subset"][sp][pr]["Recall@20"] > 0 for sp in ("valid", "test")
               for pr in ("paper", "filtered"))  # the guard compares some hits, not only zeros
    # the all-user metrics are hellm-ds evaluate's
    want = evaluate_checkpoint(ckpt, ds, batch_size=200, device="cpu")
    for split in ("valid", "test"):
        for proto in ("paper", "filtered"):
            got = s["metrics_all_users"][split][proto]
            assert all(got[k] == pytest.approx(want[split][proto][k], abs=1e-6) for k in got)
    assert "speed-up" in printed and "model mode" in printed and "OK" in printed
    assert res["summary"]["correct"] is True


def test_model_mode_guard_and_usage_errors(bench, export, tmp_path, monkeypatch):
    ckpt, data = export
    out = tmp_path / "eval.json"
    real = bench.baseline_model_eval

    def off_by_one(*a, **kw):
        metrics, pos, scores = real(*a, **kw)
        return metrics, {p: [min(r + 1, bench.TOPK) for r in v] for p, v in pos.items()}, scores

    monkeypatch.setattr(bench, "baseline_model_eval", off_by_one)
    # the 25 users test_model_mode_tiny_cpu checks to hold a hit: a shifted rank must show (10 may hold none)
    with pytest.raises(SystemExit, match="disagree"):
        bench.main(["--checkpoint", str(ckpt), "--data", str(data), "--device", "cpu", "--baseline-users", "25",
                    "--out", str(out), "--quiet"])
    saved = json.loads(out.read_text())  # written before failing
    assert saved["summary"]["correct"] is False and saved["summary"]["guard"]["topk_position_mismatches"] > 0
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="needs --data"):
        bench.main(["--checkpoint", str(ckpt), "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit, match="exclusive"):
        bench.main(["--checkpoint", str(ckpt), "--data", str(data), "--graph-emb", "x", "--quiet"])
    with pytest.raises(SystemExit, match="another dataset|max_len"):  # not the run's max_len: refused
        bench.main(["--checkpoint", str(ckpt), "--data", str(data), "--max-len", "12", "--out", str(out), "--quiet"])
    with pytest.raises(SystemExit, match="holds no export"):
        bench.main(["--checkpoint", str(tmp_path), "--data", str(data), "--out", str(out), "--quiet"])


def test_ties_rule_bf16_vectors_and_provenance(bench, data, tmp_path):
    """--ties is the evaluator's rule (recorded), --dtype bf16 rounds the vectors (both paths score in fp32, so
    the guard still holds; tied targets, if any, are checked against the tie interval); the file carries its
    command and environment."""
    out = tmp_path / "eval_bf16.json"
    argv = ["--data", str(data), "--device", "cpu", "--dim", "8", "--batch-size", "64", "--baseline-users", "40",
            "--ties", "optimistic", "--dtype", "bf16", "--out", str(out)]
    bench.main(argv)
    saved = json.loads(out.read_text())
    s = saved["summary"]
    assert s["correct"] is True and s["ties"] == "optimistic" and saved["config"]["ties"] == "optimistic"
    assert {r["params"]["dtype"] for r in saved["results"]} == {"bf16"}
    assert {r["params"]["ties"] for r in saved["results"]} == {"optimistic"}
    assert set(s["mean_ties"]) == {"valid", "test"} and s["mean_ties"]["test"]["paper"] >= 0
    assert s["guard"]["tied_targets"] >= 0 and s["guard"]["topk_position_mismatches"] == 0
    assert "rounded to bf16" in saved["data"]["vectors"]
    assert saved["command"].startswith("python launch/bench_eval.py --data ") and saved["command"].endswith(
        f"--out {out}")
    env = saved["environment"]
    assert env["date"] and env["hardware"]["cpu"] and env["versions"]["torch"] and "load" in env["hardware"]
    assert "git_commit" in env


def test_guard_accepts_a_baseline_position_inside_the_tie_interval(bench):
    ranks = {s: {p: [3, 30] for p in ("paper", "filtered")} for s in ("valid", "test")}
    ties = {s: {p: [2, 0] for p in ("paper", "filtered")} for s in ("valid", "test")}
    inside = {s: {p: [5, bench.TOPK] for p in ("paper", "filtered")} for s in ("valid", "test")}
    assert bench._count_mismatches(ranks, ties, inside) == (0, 4)  # 3 ≤ 5 ≤ 3 + 2; 30 clips to TOPK
    outside = {s: {p: [6, bench.TOPK] for p in ("paper", "filtered")} for s in ("valid", "test")}
    assert bench._count_mismatches(ranks, ties, outside) == (4, 4)
    no_ties = {s: {p: [0, 0] for p in ("paper", "filtered")} for s in ("valid", "test")}
    assert bench._count_mismatches(ranks, no_ties, inside) == (4, 0)  # without ties: the exact position
