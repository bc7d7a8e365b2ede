"""Device names: "auto" means the GPU when there is one, else the CPU."""
from __future__ import annotations

import torch

from hellm_ds.errors import UsageError


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None → ``cuda`` when available, else ``cpu``; any other name as ``torch.device`` reads it.
    A malformed name, or a CUDA device on a machine without it (or beyond its device count), is a
    ``UsageError`` — not an error deep inside the first tensor move."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UsageError(f"bad --device {name!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev
