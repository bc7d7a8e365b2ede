"""Shared helpers for the stage-2 trainer tests: paths, the fast tiny-model flags, and ``run`` — one
fine-tuning invocation as a subprocess (single process, or N ranks under the deepspeed launcher or torchrun).
The stage-1 ``tables`` and ``local_llama`` fixtures they use live in ``tests/conftest.py``.

Every run is a subprocess (a fresh process group each time), with OMP_NUM_THREADS=1: on this 2-core shared
machine two intra-op threads per rank make a tiny-model step ~30× slower (1.8 s instead of 15 ms)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from hellm_ds.utils.net import free_port

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch" / "finetune.py"
ZERO2, ZERO3 = ROOT / "ds_configs" / "zero2.json", ROOT / "ds_configs" / "zero3.json"
FAST = ["--model", "tiny", "--prefix-len", "3", "--lora-r", "4", "--micro-batch-size", "8", "--max-len", "10",
        "--no-progress", "--eval-batch-size", "200"]


def launcher_env() -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def run(tables, out: Path, *args, ranks: int = 1, config: Path = ZERO3, check: bool = True,
        launcher: str = "deepspeed"):
    data, graph, seq = tables
    common = ["--data", str(data), "--graph-emb", str(graph), "--seq-emb", str(seq), "--out", str(out),
              "--deepspeed_config", str(config), *FAST, *map(str, args)]
    if ranks == 1:
        cmd = [sys.executable, str(LAUNCH), *common]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(free_port()), str(LAUNCH), *common]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(LAUNCH), *common]
    p = run_group(cmd, env=launcher_env(), timeout=240)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def run_group(cmd: list[str], *, env: dict, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new process group that is killed whole on a timeout: a launcher's ranks (and
    any compiler they started) must not outlive a test that gave up on them."""
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          errors="replace", start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            raise AssertionError(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{out[-3000:]}\n"
                                 f"{err[-5000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in log(out) if r["event"] == "train"}
