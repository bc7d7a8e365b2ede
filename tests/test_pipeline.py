"""`hellm-ds pipeline` end to end on the synthetic data: every stage runs (fine-tuning on two CPU ranks under
ZeRO-3), the fine-tuned model beats popularity, a second call skips every stage, changed inputs are refused,
and --redo reruns a stage and what depends on it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hellm_ds.pipeline import STAGES, STAMP, downstream
from tests.train.common import run_group

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-len", "10", "--graph-epochs", "6", "--graph-eval-every", "3", "--graph-batch-size", "256",
        "--seq-epochs", "6", "--seq-eval-every", "3", "--ft-epochs", "2", "--ft-steps-per-epoch", "60",
        "--ft-micro-batch", "16", "--ft-lr", "3e-3", "--quiet"]


def pipeline(data: Path, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = run_group([sys.executable, "-m", "hellm_ds", "pipeline", "--data", str(data), "--out", str(out),
                   *FAST, *args], env=env, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-5000:]}")
    return p


def stamp_times(out: Path) -> dict[str, int]:
    return {s: (out / s / STAMP).stat().st_mtime_ns for s in STAGES}


def test_downstream_closure():
    assert downstream("graphs") == {"graphs", "graph", "finetune", "evaluate"}
    assert downstream("sasrec") == {"sasrec", "finetune", "evaluate"}
    assert downstream("popularity") == {"popularity"}


def test_pipeline_runs_skips_refuses_and_redoes(synth_dir, tmp_path):
    out = tmp_path / "run"
    p = pipeline(synth_dir, out)
    res = json.loads(p.stdout)  # stdout is the JSON alone (DeepSpeed's prints went to stderr)
    assert set(res["stages"]) == set(STAGES)
    assert res["ranks"] == 2 and res["trainable_scope"] == "full" and res["item_head"] == "tied"
    ft = res["stages"]["finetune"]
    assert ft["world_size"] == 2 and ft["zero_stage"] == 3
    models = {r["model"] for r in res["table"]}
    assert models == {"popularity", "SASRec", "graph (MMHCL)", "HeLLM fine-tuned"}
    # the reloaded export (evaluate stage) reproduces the trainer's own test metrics
    for proto in ("paper", "filtered"):
        for k, v in ft["test"][proto].items():
            assert res["stages"]["evaluate"]["test"][proto][k] == pytest.approx(v, abs=1e-6), (proto, k)
    pop = res["stages"]["popularity"]
    for split in ("valid", "test"):
        assert ft[split]["paper"]["NDCG@10"] > pop[split]["paper"]["NDCG@10"], (split, ft[split], pop[split])
    assert "HeLLM fine-tuned" in p.stderr  # the table on stderr
    # one tie rule for every stage, recorded with each stage's metrics and shown with the table
    assert res["ties"] == "expected" and "ties expected" in p.stderr
    assert {res["stages"][s]["ties"] for s in ("popularity", "graph", "sasrec", "finetune", "evaluate")} == {
        "expected"}
    assert all(r["mean_ties"] is not None for r in res["table"])
    # recommend examples of the export: 3 test users × 10 items, none from the history the model reads
    from hellm_ds.data.dataset import load_dataset

    ds = load_dataset(synth_dir, max_len=10)
    ex = res["examples"]
    assert [e["user"] for e in ex] == [int(ds.user_ids[u]) for u in ds.split("test").users[:3]]
    for e in ex:
        assert len(e["items"]) == 10 and len(e["scores"]) == 10 and 0 not in e["items"]
        assert not set(e["items"]) & set(ds.history(int(ds.user_index([e["user"]])[0]))[-10:].tolist())

    before = stamp_times(out)
    p = pipeline(synth_dir, out)
    assert stamp_times(out) == before and p.stderr.count("skipped") == len(STAGES)
    assert json.loads(p.stdout)["table"] == res["table"]

    p = pipeline(synth_dir, out, "--ft-lr", "1e-3", check=False)  # changed inputs: refused, nothing touched
    assert p.returncode == 2 and "--redo finetune" in p.stderr, p.stderr[-2000:]
    assert stamp_times(out) == before

    pipeline(synth_dir, out, "--redo", "evaluate")
    after = stamp_times(out)
    assert after["evaluate"] > before["evaluate"]
    assert all(after[s] == before[s] for s in STAGES if s != "evaluate")
