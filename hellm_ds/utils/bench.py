"""The results file every benchmark script writes: a header, one record per case, a summary."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _clean(o):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_bench_json(path: str | Path, header: dict, records: list[dict], summary) -> None:
    """``{**header, "results": records, "summary": summary}``, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_clean({**header, "results": records, "summary": summary}), indent=1,
                              ensure_ascii=False))
    os.replace(tmp, path)
