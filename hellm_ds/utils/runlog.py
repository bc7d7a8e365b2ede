"""Metrics log of a run: one JSON object per line in ``DIR/log.jsonl`` (and TensorBoard when installed).
Only rank 0 writes; other ranks get a logger that does nothing."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def _flatten(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(obj, (int, float)) or hasattr(obj, "item"):
        out[prefix] = float(_jsonable(obj))


class RunLog:
    def __init__(self, out_dir: str | Path | None, enabled: bool = True, tensorboard: bool = True,
                 fresh: bool = False):
        """``fresh=True`` starts a new log (a new run); otherwise records append (a resumed run)."""
        self.enabled = enabled and out_dir is not None
        self.path = None if not self.enabled else Path(out_dir) / "log.jsonl"
        self._tb = None
        self._t0 = time.time()
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if fresh:
                self.path.unlink(missing_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(Path(out_dir) / "tb"))
                except Exception:  # tensorboard is optional
                    self._tb = None

    def log(self, event: str, step: int | None = None, **fields) -> None:
        if not self.enabled:
            return
        rec = {"event": event, "time": round(time.time() - self._t0, 3)}
        if step is not None:
            rec["step"] = step
        rec.update({k: _jsonable(v) if not isinstance(v, dict) else v for k, v in fields.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(rec, default=_jsonable) + "\n")
        if self._tb is not None and step is not None:
            flat: dict = {}
            _flatten(event, {k: v for k, v in fields.items()}, flat)
            for k, v in flat.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_log(path: str | Path) -> list[dict]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
