"""The results file every benchmark script writes: a header, one record per case, a summary.

Every file also carries its provenance (``command`` and ``environment``: date, git commit, hardware with the
load average when written, library versions), so that ``hellm-ds report`` can generate the README's
Benchmarks table from the committed files alone (``results/bench/*.json``).
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from hellm_ds.utils.io import strict_json

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONED = ("hellm_ds", "torch", "triton", "transformers", "deepspeed", "peft", "flash_attn", "numpy")


def command_line(script: str | Path, argv: list[str] | None = None) -> str:
    """How the benchmark was started: ``python launch/<script> ARGS`` (``argv`` default: ``sys.argv[1:]``),
    the script's path relative to the repository when it lies inside it."""
    script = Path(script).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        pass
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", str(script), *args])


def cpu_model() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


@functools.lru_cache(maxsize=1)
def _static_environment() -> dict:
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            mod = sys.modules.get(dist)
            return getattr(mod, "__version__", None)

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD") or None
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"git_commit": commit, "cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu,
            "versions": {d: version(d) for d in VERSIONED}, "python": platform.python_version()}


def environment() -> dict:
    """Date (UTC), git commit (``+dirty`` with uncommitted changes to tracked files), hardware (CPU model,
    cores, GPU, 1-minute load average now), library versions, Python."""
    s = _static_environment()
    try:
        load = round(os.getloadavg()[0], 1)
    except OSError:
        load = None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "git_commit": s["git_commit"],
            "hardware": {"cpu": s["cpu"], "cores": s["cores"], "gpu": s["gpu"], "load": load},
            "versions": dict(s["versions"]), "python": s["python"]}


def write_bench_json(path: str | Path, header: dict, records: list[dict], summary, command: str | None = None
                     ) -> None:
    """``{**header, "command": …, "environment": …, "results": records, "summary": summary}``, written
    atomically. ``command`` (see ``command_line``) and ``environment()`` are added unless the header has
    them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = dict(header)
    if command is not None or "command" not in header:
        header["command"] = command if command is not None else command_line(sys.argv[0])
    header.setdefault("environment", environment())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(strict_json({**header, "results": records, "summary": summary}), indent=1,
                              ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def sync(device) -> None:
    """Wait for queued GPU work before reading a clock (no-op on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def max_rss_mb() -> float:
    """This process's peak resident memory so far (CPU peak memory)."""
    try:
        import resource
    except ImportError:
        return float("nan")
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def fmt_cell(v, spec: str) -> str:
    """A table cell: ``format(v, spec)``, or "-" for a missing or non-finite value."""
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)
