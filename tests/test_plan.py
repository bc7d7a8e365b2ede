"""The run plan (hellm_ds.plan): when a budget applies, the cost models' choices fit it and keep explicit
settings, and — end to end on the synthetic data with a one-minute budget — the plan is printed, recorded in
RUN/plan.json, decides the stages' settings (so their keys), and a rerun reuses it and skips every stage."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hellm_ds.pipeline import STAGES, STAMP, PipelineConfig
from hellm_ds.plan import (CPU_BUDGET_MINUTES, PLAN_NAME, EpochCost, StepCost, allocate, budget_minutes,
                           decide, with_default_epochs)
from tests.train.common import run_group

ROOT = Path(__file__).resolve().parents[1]


# ---- pure parts --------------------------------------------------------------------------------------------
def test_budget_applies_by_default_on_cpu_only_without_stage_settings():
    cfg = PipelineConfig(data="d", out="o")
    assert budget_minutes(cfg, cuda=False) == CPU_BUDGET_MINUTES
    assert budget_minutes(cfg, cuda=True) is None  # GPU: the epoch defaults
    for flag, value in (("graph_epochs", 3), ("graph_time_budget", 9.0), ("seq_epochs", 3),
                        ("seq_time_budget", 9.0), ("ft_epochs", 2), ("ft_steps_per_epoch", 5)):
        assert budget_minutes(PipelineConfig(data="d", out="o", **{flag: value}), cuda=False) is None, flag
        with_budget = PipelineConfig(data="d", out="o", budget_minutes=7, **{flag: value})
        assert budget_minutes(with_budget, cuda=True) == 7
    assert budget_minutes(PipelineConfig(data="d", out="o", budget_minutes=0), cuda=False) is None
    micro = PipelineConfig(data="d", out="o", ft_micro_batch=64)  # not a length setting
    assert budget_minutes(micro, cuda=False) == CPU_BUDGET_MINUTES
    # without a plan every unset epoch count is the recipe's default (the keys of GPU runs are unchanged)
    r = with_default_epochs(cfg)
    assert (r.graph_epochs, r.seq_epochs, r.ft_epochs) == (200, 200, 20)
    assert r.graph_time_budget is None and r.seq_time_budget is None and r.ft_steps_per_epoch is None


def test_epoch_cost_fit_crosses_the_budget_in_the_last_epoch_that_fits():
    c = EpochCost(epoch_s=10.0, valid_s=3.0, test_s=3.0, setup_s=1.0, eval_every=5, max_epochs=200)
    for seconds in (5.0, 20.0, 57.0, 133.0, 500.0):
        n, budget = c.fit(seconds)
        assert c.epochs_within(budget) == n
        assert n == 1 or c.estimate(n) <= seconds
        assert n == c.max_epochs or c.estimate(n + 1) > seconds
    n, budget = c.fit(1e6)  # all 200 epochs fit: the budget is only a guard
    assert n == 200 and c.epochs_within(budget) == 200


def test_allocate_caps_and_redistributes():
    a = allocate(100.0, {"graph": 5.0, "sasrec": 1000.0, "finetune": 1000.0})
    assert a["graph"] == 5.0 and sum(a.values()) == pytest.approx(100.0)
    assert a["finetune"] / a["sasrec"] == pytest.approx(0.5 / 0.2)
    assert sum(allocate(100.0, {"graph": 1.0, "sasrec": 2.0, "finetune": 3.0}).values()) == 6.0


def test_step_cost_choose():
    f = StepCost(step_s=0.5, full_steps=1000, eval_s=20.0, fixed_s=30.0, max_epochs=20)
    assert f.choose(30 + 20 * 520 + 1) == (20, None)  # the default fits: 20 whole epochs
    e, s = f.choose(30 + 2.5 * 520)  # two whole epochs and half of one more: three shorter epochs
    assert e == 3 and s is not None and e * s > 2 * 1000 and f.estimate(e, s) <= 30 + 2.5 * 520
    e, s = f.choose(330.0)  # not one whole epoch: evaluation ≤ 20% of it, ≥ 50 steps per epoch
    assert s is not None and e * 20 <= 0.2 * 300 + 1e-9 and s >= 50 and f.estimate(e, s) <= 330
    assert f.choose(330.0, epochs=2) == (2, f._steps(300.0, 2))  # given epochs kept
    assert f.choose(330.0, epochs=2, steps=7) == (2, 7)


@pytest.mark.parametrize("budget_min", [2, 10, 60, 600])
def test_decide_fits_the_budget_and_keeps_explicit_settings(budget_min):
    g = EpochCost(epoch_s=78.0, valid_s=7.0, test_s=7.0, setup_s=2.0, eval_every=5, max_epochs=200)
    s = EpochCost(epoch_s=42.0, valid_s=6.5, test_s=6.5, setup_s=0.1, eval_every=1, max_epochs=200)
    f = StepCost(step_s=0.2, full_steps=6640, eval_s=35.0, fixed_s=45.0, max_epochs=20)
    budget, spent, ev = budget_min * 60.0, 10.0, 40.0
    d = decide(budget, spent, ev, g, s, f, {})
    est = d["estimates"]
    assert set(est) == {"graph", "sasrec", "finetune", "evaluate"}
    if budget_min >= 10:  # feasible: one epoch of each stage fits
        assert spent + sum(est.values()) <= budget
    assert d["settings"]["graph_time_budget"] >= 1 and d["settings"]["seq_time_budget"] >= 1
    assert d["settings"]["ft_epochs"] >= 1
    explicit = {"seq_time_budget": 100.0, "ft_epochs": 3}
    d2 = decide(budget, spent, ev, g, s, f, explicit)
    assert d2["settings"]["seq_time_budget"] == 100.0 and d2["settings"]["ft_epochs"] == 3
    assert "sasrec" not in d2["allocated"]
    if budget_min >= 10:
        assert spent + sum(d2["estimates"].values()) <= budget


# ---- end to end ---------------------------------------------------------------------------------------
def pipeline(data: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = run_group([sys.executable, "-m", "hellm_ds", "pipeline", "--data", str(data), "--out", str(out),
                   "--max-len", "10", "--ranks", "1", "--ft-micro-batch", "16", "--quiet", *args],
                  env=env, timeout=600)
    if p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-5000:]}")
    return p


def stamp(out: Path, stage: str) -> dict:
    return json.loads((out / stage / STAMP).read_text())


def test_plan_decides_is_recorded_and_reused(synth_dir, tmp_path):
    out = tmp_path / "run"
    # a one-minute budget; SASRec's time budget and the fine-tuning epochs given explicitly: they win
    args = ("--budget-minutes", "1", "--seq-time-budget", "2", "--ft-epochs", "2")
    p = pipeline(synth_dir, out, *args)
    assert "plan for a 1-minute budget" in p.stderr and "timed in" in p.stderr, p.stderr[-3000:]
    plan = json.loads((out / PLAN_NAME).read_text())
    st = plan["settings"]
    assert st["seq_time_budget"] == 2.0 and st["ft_epochs"] == 2
    assert sorted(plan["explicit"]) == ["ft_epochs", "seq_time_budget"]
    assert st["graph_time_budget"] >= 1  # the plan's
    # the stages ran with the plan's settings (they are in their keys)
    assert stamp(out, "graph")["inputs"]["config"]["time_budget"] == st["graph_time_budget"]
    assert stamp(out, "sasrec")["inputs"]["config"]["time_budget"] == 2.0
    ft = stamp(out, "finetune")["inputs"]["args"]
    assert ft["epochs"] == 2 and ft["steps_per_epoch"] == st["ft_steps_per_epoch"]
    res = json.loads(p.stdout)
    rep = res["plan"]
    assert rep["settings"] == st and rep["budget_minutes"] == 1
    # the plan fits its budget, or (a machine too busy for even the shortest runs) says it cannot
    assert rep["estimate_s"] <= 60 + 1e-6 or "over budget: even the shortest runs do not fit" in p.stderr, rep
    for s in ("popularity", "graphs", "plan", "graph", "sasrec", "finetune", "evaluate"):
        assert rep["stages"][s]["estimate_s"] is not None and rep["stages"][s]["seconds"] is not None, s
    assert "plan vs run" in p.stderr

    before = {s: (out / s / STAMP).stat().st_mtime_ns for s in STAGES}
    p = pipeline(synth_dir, out, *args)  # a rerun: the recorded plan, every stage skipped
    assert "reused" in p.stderr and "planning for" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.count("skipped") == len(STAGES)
    assert {s: (out / s / STAMP).stat().st_mtime_ns for s in STAGES} == before
    assert json.loads((out / PLAN_NAME).read_text()) == plan
    assert json.loads(p.stdout)["plan"]["settings"] == st
