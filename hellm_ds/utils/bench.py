"""The results file every benchmark script writes: a header, one record per case, a summary."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path

from hellm_ds.utils.io import strict_json


def write_bench_json(path: str | Path, header: dict, records: list[dict], summary) -> None:
    """``{**header, "results": records, "summary": summary}``, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(strict_json({**header, "results": records, "summary": summary}), indent=1,
                              ensure_ascii=False))
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
