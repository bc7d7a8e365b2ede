"""launch/gpu_check.sh on a machine without a GPU: its syntax, its summary writer (one JSON per run, the format
`hellm-ds report` renders into the README's Benchmarks table), and the script itself with the steps that run
anywhere (probe, flash_attn's skip) plus a previous summary for the rest. No GPU result is committed: the
sample summary lives here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hellm_ds.report import GPU_CHECK, GPU_STEPS, format_bench_table, load_bench, write_gpu_summary

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "gpu_check.sh"


def test_script_syntax_and_steps():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    limits = {}
    for line in text.splitlines():
        if line.startswith("step "):
            name, limit = line.split()[1:3]
            limits[name] = int(limit)
    assert tuple(limits) == GPU_STEPS  # every step, in the summary's order
    # ready to run unattended within 6 minutes: the limits as the header states them, room for setup
    assert sum(limits.values()) <= 340 and f"sum to\n# {sum(limits.values())} s" in text
    for needle in ("zero3.json", "zero3_offload.json", "flash_attention_2", "--dtype bf16", "--model small",
                   "write_gpu_summary", "kernel_choices"):
        assert needle in text, needle


def _status(out: Path, name: str, rc: int, seconds: int, limit: int) -> None:
    (out / "steps").mkdir(parents=True, exist_ok=True)
    (out / "steps" / f"{name}.status").write_text(f"{rc} {seconds} {limit}\n")


def _fake_run(out: Path) -> None:
    """What a GPU run leaves in $OUT: status files, logs and each benchmark's JSON."""
    _status(out, "kernel_tests", 0, 41, 55)
    (out / "kernel_tests.log").write_text("....\n212 passed, 3 skipped in 38.20s\n")
    _status(out, "probe", 0, 6, 10)
    (out / "probe.json").write_text(json.dumps({"device": "NVIDIA H200", "probe": "ok",
                                                "choices": [{"op": "spmm", "d": 64, "dtype": "float32",
                                                             "chosen": "triton_tile", "candidates": [
                                                                 {"name": "triton", "status": "ok", "ms": 0.21},
                                                                 {"name": "triton_tile", "status": "ok",
                                                                  "ms": 0.152}]}]}))
    _status(out, "bench_kernels", 0, 66, 70)
    (out / "bench_kernels.json").write_text(json.dumps({
        "summary": [{"graph": "powerlaw-1Mx300k-16M", "what": "project[triton] SpMM vs cuSPARSE, d=64 fp32 "
                                                            "(speed-up)", "value": 1.42, "target": ">= 1.3"}],
        "results": [{"name": "x", "status": "ok", "metrics": {"correct": True}}]}))
    finetune = {"results": [{"name": "hf_peft", "status": "ok", "metrics": {"samples_per_s": 10.0}},
                            {"name": "hellm", "status": "ok", "note": "DeepSpeed engine, ZeRO-3",
                             "metrics": {"samples_per_s": 9.0, "ms_per_step": 888.0, "mfu": 0.31,
                                         "peak_mem_mb": 40960.0}}],
                "summary": {"ratio_samples_per_s": 0.9}}
    _status(out, "zero3_step", 0, 60, 65)
    (out / "zero3_step.json").write_text(json.dumps(finetune))
    _status(out, "zero3_offload", 124, 45, 45)  # cut at its limit
    _status(out, "flash_attn", 0, 1, 30)
    (out / "flash_attn.skip").write_text("flash-attn does not import on this image\n")
    _status(out, "eval_bf16", 1, 20, 25)
    (out / "eval_bf16.json").write_text(json.dumps({
        "results": [{"name": "project", "metrics": {"seconds": 0.8, "users_per_s": 48530.0}}],
        "summary": {"speedup": 31.0, "correct": False, "ties": "expected",
                    "mean_ties": {"test": {"paper": 0.25, "filtered": 0.2}}, "guard": {"tied_targets": 7}}}))
    # pipeline_toys did not run (not in the status files)


def test_summary_writer_and_the_readme_rows(tmp_path):
    out = tmp_path / "out"
    _fake_run(out)
    failed = write_gpu_summary(out, list(GPU_STEPS))
    summary = json.loads((out / GPU_CHECK).read_text())
    assert failed == summary["failed"] == 2  # zero3_offload timed out, eval_bf16 failed; a skip is no failure
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == list(GPU_STEPS)
    assert steps["kernel_tests"]["status"] == "passed" and steps["kernel_tests"]["figures"] == {"passed": 212,
                                                                                               "skipped": 3}
    assert steps["kernel_tests"]["seconds"] == 41 and steps["kernel_tests"]["limit_s"] == 55
    assert steps["probe"]["figures"] == {"device": "NVIDIA H200", "probe": "ok", "spmm d 64 float32 chosen":
                                         "triton_tile (triton ok 0.21 ms, triton_tile ok 0.152 ms)"}
    assert steps["bench_kernels"]["figures"]["power-law 1M×300k (16M nnz): project[triton] SpMM vs cuSPARSE, "
                                             "d=64 fp32 (speed-up)"] == 1.42
    z = steps["zero3_step"]["figures"]
    assert z["hellm MFU %"] == pytest.approx(31.0) and z["hellm / hf_peft samples/s"] == 0.9
    assert z["hellm peak GB"] == 40.0
    assert steps["zero3_offload"]["status"] == "timeout"
    assert steps["flash_attn"]["status"] == "skipped" and "flash-attn" in steps["flash_attn"]["note"]
    e = steps["eval_bf16"]
    assert e["status"] == "failed" and e["figures"]["mean ties test paper"] == 0.25
    assert e["figures"]["tied targets in the guard subset"] == 7
    assert steps["pipeline_toys"]["status"] == "not run"
    env = summary["environment"]
    assert env["date"] and env["hardware"]["cores"] and "torch" in env["versions"]

    # `hellm-ds report` renders it: one row per step
    bench = tmp_path / "results" / "bench"
    bench.mkdir(parents=True)
    shutil.copy(out / GPU_CHECK, bench / GPU_CHECK)
    files, gpu = load_bench(bench)
    assert files == [] and gpu is not None
    table = format_bench_table(files, gpu)
    rows = [ln for ln in table.splitlines() if ln.startswith("| `bash launch/gpu_check.sh` step")]
    assert [r.split("`")[3] for r in rows] == list(GPU_STEPS)
    assert "pending" not in table
    row = {r.split("`")[3]: r for r in rows}
    assert "**passed** in 41 s (limit 55 s): passed 212; skipped 3 |" in row["kernel_tests"]
    assert "hellm MFU % 31; hellm peak GB 40;" in row["zero3_step"]
    assert "hellm / hf_peft samples/s 0.9 |" in row["zero3_step"]
    assert "**timeout** in 45 s (limit 45 s)" in row["zero3_offload"]
    assert "**skipped** in 1 s (limit 30 s) — flash-attn does not import" in row["flash_attn"]
    assert "**not run**" in row["pipeline_toys"]


def test_script_runs_here_with_the_steps_that_need_no_gpu(tmp_path):
    """probe and flash_attn run for real (no GPU: no probe decision, flash-attn absent → skipped); the other
    steps keep a previous summary's entries; exit status = failed steps."""
    prev_out = tmp_path / "prev"
    _fake_run(prev_out)
    write_gpu_summary(prev_out, list(GPU_STEPS))
    previous = json.loads((prev_out / GPU_CHECK).read_text())
    previous["environment"]["date"] = "2026-01-01"
    for s in previous["steps"]:
        s["date"] = "2026-01-01"
    (prev_out / GPU_CHECK).write_text(json.dumps(previous))
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_STEPS": "probe flash_attn",
           "GPU_CHECK_PREVIOUS": str(prev_out / GPU_CHECK),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    summary = json.loads((out / GPU_CHECK).read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["probe"]["status"] == "passed", p.stderr[-2000:]
    assert steps["probe"]["date"] != "2026-01-01"
    probe = json.loads((out / "probe.json").read_text())
    assert probe["probe"]  # "ok", "no decision recorded …" or "not available …": recorded either way
    assert steps["flash_attn"]["status"] in ("skipped", "passed")
    # steps not run this time: the previous summary's, with its date
    assert steps["zero3_step"]["date"] == "2026-01-01" and steps["zero3_step"]["figures"]["hellm MFU %"] == 31.0
    assert steps["zero3_offload"]["status"] == "timeout"
    assert summary["command"] == 'bash launch/gpu_check.sh (GPU_CHECK_STEPS="probe flash_attn")'
    assert p.returncode == 0, p.stderr[-2000:]  # failures of earlier runs are not this run's
