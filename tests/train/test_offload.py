"""ZeRO-Offload's optimiser (hellm_ds.train.optim): DeepSpeedCPUAdam — DeepSpeed's C++ ``cpu_adam`` op —
whenever the DeepSpeed config offloads the optimiser, torch AdamW otherwise or with ``--offload-optimizer
torch`` (the slow fall-back). The decision is unit-tested for a CUDA device without one; the op path runs on
CPU (DeepSpeed's CPU accelerator builds the same op) with two ranks and ``ds_configs/zero3_offload.json``.

The op is JIT-compiled once per session (about 3 minutes on a loaded 2-core machine with a cold cache) into a
directory of its own, so the other stage-2 tests still see an empty session extension cache."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from hellm_ds.errors import UsageError
from hellm_ds.train.finetune import FinetuneConfig, load_ds_config
from hellm_ds.train.optim import OptimizerBuildError, build_optimizer, offload_optimizer_plan
from tests.train.common import ROOT, ZERO3, launcher_env, log, losses, run

OFFLOAD = ROOT / "ds_configs" / "zero3_offload.json"
BUILD_TIMEOUT = 900  # cold JIT build of cpu_adam: ~190 s measured on the shared 2-core machine


def _cfg(config, choice="auto") -> FinetuneConfig:
    return FinetuneConfig("d", "g", "s", "o", deepspeed_config=str(config), offload_optimizer=choice)


def _groups():
    w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.zeros(3))
    return [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}]


# ---- the decision (no GPU, no build) ------------------------------------------------------------------
def test_cuda_offload_config_picks_cpu_adam(monkeypatch, capsys):
    """On a CUDA device zero3_offload.json keeps DeepSpeed's guard (zero_force_ds_cpu_optimizer not false: a
    client torch AdamW would be refused) and the trainer picks DeepSpeedCPUAdam; the CPU-only overrides (fp32,
    no pinned memory) are not applied. On CPU the decision is the same."""
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.delenv("RANK", raising=False)
    ds = load_ds_config(_cfg(OFFLOAD), torch.device("cuda"))
    assert ds.get("zero_force_ds_cpu_optimizer", True) is not False
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["offload_optimizer"]["pin_memory"]
    assert offload_optimizer_plan(ds, "auto", warn=False) == (ds, "cpu_adam")
    assert offload_optimizer_plan(ds, "cpu_adam", warn=False) == (ds, "cpu_adam")
    assert DeepSpeedConfig(ds).zero_force_ds_cpu_optimizer is True  # DeepSpeed's own reading of it
    cpu = load_ds_config(_cfg(OFFLOAD), torch.device("cpu"))
    assert cpu.get("zero_force_ds_cpu_optimizer", True) is not False and not cpu["bf16"]["enabled"]
    assert offload_optimizer_plan(cpu, "auto", warn=False)[1] == "cpu_adam"
    assert capsys.readouterr().err == ""  # nothing to warn about


def test_torch_choice_sets_flag_and_warns_once(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    ds = load_ds_config(_cfg(OFFLOAD, "torch"), torch.device("cuda"))
    assert ds["zero_force_ds_cpu_optimizer"] is False
    err = capsys.readouterr().err
    assert err.count("warning: --offload-optimizer torch") == 1 and "slower" in err, err
    _, kind = offload_optimizer_plan(ds, "torch", warn=False)  # finetune() asks again, silently
    assert kind == "torch" and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")  # one warning per run: rank 0's
    load_ds_config(_cfg(OFFLOAD, "torch"), torch.device("cuda"))
    assert capsys.readouterr().err == ""
    opt = build_optimizer(_groups(), kind, 3e-4, (0.9, 0.95), 0.1)
    assert type(opt) is torch.optim.AdamW
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["lr"] == 3e-4 for g in opt.param_groups)


def test_no_offload_uses_torch_adamw(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    for choice in ("auto", "torch"):
        ds = load_ds_config(_cfg(ZERO3, choice), torch.device("cuda"))
        assert "zero_force_ds_cpu_optimizer" not in ds
        assert offload_optimizer_plan(ds, choice, warn=False)[1] == "torch"
    assert capsys.readouterr().err == ""
    with pytest.raises(UsageError, match="cpu_adam needs a DeepSpeed config that offloads"):
        load_ds_config(_cfg(ZERO3, "cpu_adam"), torch.device("cuda"))
    with pytest.raises(UsageError, match="offload_optimizer must be one of"):
        offload_optimizer_plan({}, "adam")


def test_cli_flag():
    from hellm_ds.train.finetune import build_parser, config_from_args

    base = ["--data", "d", "--graph-emb", "g", "--seq-emb", "s", "--out", "o"]
    assert config_from_args(base).offload_optimizer == "auto"
    assert config_from_args([*base, "--offload-optimizer", "torch"]).offload_optimizer == "torch"
    text = " ".join(build_parser().format_help().split())
    assert "--offload-optimizer {auto,cpu_adam,torch}" in text and "(default: auto)" in text
    with pytest.raises(SystemExit):
        config_from_args([*base, "--offload-optimizer", "adam"])


def test_cpu_adam_build_failure_is_one_clear_error(monkeypatch):
    """The op cannot build: one error naming the op, the compiler's reason and the fall-back flag (a
    UsageError: the CLI prints it and exits 2) instead of DeepSpeedCPUAdam's bare RuntimeError."""
    import deepspeed.ops.op_builder as op_builder

    class Broken:
        def load(self, verbose=False):
            raise RuntimeError("Error building extension 'cpu_adam': [1/3] c++ -MMD -MF cpu_adam.o.d ...\n"
                               "FAILED: cpu_adam.o\n"
                               "csrc/includes/simd.h:12:10: fatal error: immintrin.h: No such file")

    monkeypatch.setattr(op_builder, "CPUAdamBuilder", Broken)
    with pytest.raises(OptimizerBuildError) as info:
        build_optimizer(_groups(), "cpu_adam", 3e-4, (0.9, 0.95), 0.1)
    msg = str(info.value)
    assert isinstance(info.value, UsageError)
    for part in ("DeepSpeedCPUAdam", "`cpu_adam`", "Error building extension 'cpu_adam'",
                 "fatal error: immintrin.h: No such file", "--offload-optimizer torch",
                 "TORCH_EXTENSIONS_DIR"):
        assert part in msg, (part, msg)


# ---- the op path on CPU (two ranks) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_adam_op(cold_torch_extensions, tmp_path_factory):
    """DeepSpeed's cpu_adam op, JIT-built once into an extension cache of this module's own (the session's
    stays empty for the tests that assert nothing is compiled). Two processes load it at once from the cold
    cache, as two ranks do: one builds, the other waits on the build directory's lock file, both load it."""
    path = tmp_path_factory.mktemp("torch_extensions_cpu_adam")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_EXTENSIONS_DIR", str(path))
        code = ("import time; t = time.time(); from deepspeed.ops.op_builder import CPUAdamBuilder; "
                "CPUAdamBuilder().load(); print(f'cpu_adam loaded after {time.time() - t:.1f} s')")
        t0 = time.time()
        procs = [subprocess.Popen([sys.executable, "-c", code], env=launcher_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace",
                                  start_new_session=True) for _ in range(2)]
        outs = []
        try:
            for p in procs:
                outs.append(p.communicate(timeout=max(1.0, BUILD_TIMEOUT - (time.time() - t0)))[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            pytest.fail(f"building DeepSpeed's cpu_adam op took over {BUILD_TIMEOUT} s")
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-5000:]
        print(f"cpu_adam built and loaded by 2 processes in {time.time() - t0:.1f} s", file=sys.stderr)
        assert any(d.name.startswith("cpu_adam") for d in path.iterdir())
        yield path


def test_two_ranks_zero3_offload_uses_cpu_adam(tables, tmp_path, cpu_adam_op):
    """`deepspeed --num_gpus 2` (DS_ACCELERATOR=cpu) with zero3_offload.json and the default choice: the
    engine's optimiser is DeepSpeedCPUAdam (start record, results.json) and the loss falls."""
    out = tmp_path / "run"
    run(tables, out, "--epochs", "1", "--steps-per-epoch", "16", "--skip-eval", "--lr", "3e-3",
        "--warmup-epochs", "0.1", ranks=2, config=OFFLOAD)
    start = [r for r in log(out) if r["event"] == "start"][0]
    assert start["optimizer"] == "DeepSpeedCPUAdam" and start["world_size"] == 2 and start["zero_stage"] == 3
    assert start["config"]["offload_optimizer"] == "auto"
    res = json.loads((out / "results.json").read_text())
    assert res["optimizer"] == "DeepSpeedCPUAdam" and res["global_step"] == 16
    ls = [losses(out)[s] for s in range(1, 17)]
    first, last = sum(ls[:4]) / 4, sum(ls[-4:]) / 4
    assert last < first - 0.05, (first, last, ls)


def test_cpu_adam_same_losses_as_torch_fallback(tables, tmp_path, cpu_adam_op):
    """Same hyper-parameters, parameter groups and per-step learning rates (warm-up then cosine, set by the
    scheduler in each group): DeepSpeedCPUAdam and `--offload-optimizer torch` follow the same loss curve
    (fp32: 1e-5 relative); the fall-back warns once that it is slow."""
    args = ("--epochs", "2", "--steps-per-epoch", "3", "--skip-eval", "--lr", "1e-3", "--weight-decay", "0.1")
    run(tables, tmp_path / "cpu_adam", *args, config=OFFLOAD)
    p = run(tables, tmp_path / "torch", *args, "--offload-optimizer", "torch", config=OFFLOAD)
    assert p.stderr.count("warning: --offload-optimizer torch") == 1, p.stderr[-3000:]
    kinds = [[r for r in log(tmp_path / d) if r["event"] == "start"][0]["optimizer"]
             for d in ("cpu_adam", "torch")]
    assert kinds == ["DeepSpeedCPUAdam", "AdamW"]
    a, b = losses(tmp_path / "cpu_adam"), losses(tmp_path / "torch")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert a[s] == pytest.approx(b[s], rel=1e-5), (s, a[s], b[s])
