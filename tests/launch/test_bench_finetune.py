"""launch/bench_finetune.py on the CPU with the tiny model: JSON shape, both methods, the shared batches."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.launch.conftest import load_script



@pytest.fixture(scope="module")
def bench():
    yield from load_script("bench_finetune")


def test_history_lengths_beauty_shaped(bench):
    lens = bench.history_lengths(200_000, np.random.default_rng(0))
    assert lens.min() == 5 and lens.max() <= 50 and lens.max() >= 40
    assert abs(lens.mean() - 9.0) < 0.1


def test_batches(bench):
    batches = bench.make_batches(50, 8, 12000, seed=1)
    again = bench.make_batches(50, 8, 12000, seed=1)
    lens = []
    for b, c in zip(batches, again):
        for k in b:
            assert torch.equal(b[k], c[k])  # deterministic: both methods see the same batches
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == 8
        assert bool(((ids > 0) == mask.bool()).all())  # item ids 1..I exactly where unmasked
        assert int(ids.max()) <= 12000 and int(b["targets"].min()) >= 1 and int(b["targets"].max()) <= 12000
        assert bool((mask[:, -1] == 1).all())  # left-padded
        lens += mask.sum(1).tolist()
    assert min(lens) >= 5 and max(lens) <= 50 and 7 < np.mean(lens) < 11


def test_baseline_batch_same_token_count(bench):
    b = bench.make_batches(1, 4, 100, seed=2)[0]
    pi, ri = torch.tensor([1, 5, 6, 7]), torch.tensor([8, 9])
    bb = bench.baseline_batch(b, pi, ri, vocab=50)
    assert bb["input_ids"].shape[1] == 4 + b["input_ids"].shape[1] + 2
    assert torch.equal(bb["attention_mask"].sum(1), b["attention_mask"].sum(1) + 6)
    assert bool((bb["input_ids"][bb["attention_mask"].bool()] > 0).all())
    assert torch.equal(bb["targets"], b["targets"])


def test_main_cpu_tiny(bench, tmp_path, monkeypatch):
    seen = {}
    orig = bench.run_method

    def spy(name, setup, args, device, dtype, batches, *a, **k):
        seen[name] = batches
        return orig(name, setup, args, device, dtype, batches, *a, **k)

    monkeypatch.setattr(bench, "run_method", spy)
    out = tmp_path / "bf.json"
    res = bench.main(["--device", "cpu", "--model", "tiny", "--steps", "3", "--warmup", "1", "--items", "500",
                      "--out", str(out), "--quiet"])
    assert seen["hellm"] is seen["hf_peft"]  # the very same batch objects
    data = json.loads(out.read_text())
    for k in ("benchmark", "date", "device", "torch", "peak_tflops", "peak_flops_source", "config", "results",
              "summary"):
        assert k in data
    assert data["benchmark"] == "finetune" and data["device_type"] == "cpu"
    assert [r["name"] for r in data["results"]] == ["hellm", "hf_peft"]
    for r in data["results"]:
        assert set(r) == {"name", "params", "metrics", "status", "note"}
        assert r["status"] == "ok", r["note"]
        m = r["metrics"]
        for key in ("ms_per_step", "samples_per_s", "tokens_per_s", "mfu", "peak_mem_mb", "n_params",
                    "n_trainable", "loss_first"):
            assert isinstance(m[key], (int, float)) and math.isfinite(m[key]) and m[key] > 0, (r["name"], key)
        assert m["n_trainable"] < m["n_params"]  # lora scope
    # both methods see the same number of (non-padding) tokens
    t = [r["metrics"]["tokens_per_step"] for r in data["results"]]
    assert t[0] == t[1]
    ratio = data["summary"]["ratio_samples_per_s"]
    assert ratio > 0 and math.isclose(
        ratio, data["results"][0]["metrics"]["samples_per_s"] / data["results"][1]["metrics"]["samples_per_s"])
    assert res["summary"] == data["summary"]


def test_zero3_offload_step_on_cpu(bench, tmp_path, monkeypatch):
    """The gpu_check's zero3_offload step, here on DeepSpeed's CPU accelerator: ds_configs/zero3_offload.json
    with --offload-optimizer torch (DeepSpeedCPUAdam would need its JIT build), eager attention; the HeLLM row
    runs through the engine (no fall-back to the plain loop) and the file carries its provenance."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = tmp_path / "offload.json"
    argv = ["--device", "cpu", "--model", "tiny", "--deepspeed-config", "ds_configs/zero3_offload.json",
            "--offload-optimizer", "torch", "--attn-implementation", "eager", "--methods", "hellm", "--steps", "2",
            "--warmup", "1", "--items", "300", "--out", str(out), "--quiet"]
    monkeypatch.chdir(bench.__file__.rsplit("/launch/", 1)[0])
    bench.main(argv)
    data = json.loads(out.read_text())
    (rec,) = data["results"]
    assert rec["status"] == "ok", rec["note"]
    assert "ZeRO-3" in rec["note"] and "zero3_offload.json" in rec["note"] and "fell back" not in rec["note"]
    assert data["config"]["offload_optimizer"] == "torch" and data["config"]["attn_implementation"] == "eager"
    assert data["command"].startswith("python launch/bench_finetune.py --device cpu")
    assert data["environment"]["versions"]["deepspeed"]
