"""Atomic checkpoints and safetensors exports.

- ``save_state`` / ``load_state``: a training state (model, optimiser, RNG, counters) through ``torch.save``,
  read back with ``torch.load(weights_only=True)`` — no code runs on load; the write goes to a temporary
  file renamed into place, so an interrupted write never replaces the last good checkpoint.
- ``export_tensors`` / ``load_tensors``: the artefacts other stages read (safetensors + JSON metadata); an
  export refuses to overwrite a file made from a different dataset.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.utils.io import atomic_write


def save_state(path: str | Path, state: dict) -> Path:
    return atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, Exception) as e:  # a truncated zip raises several types
        raise DataFormatError(path, None, f"unreadable checkpoint ({type(e).__name__}: {e})") from None


def export_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict,
                   dataset_fingerprint: str, overwrite_other_dataset: bool = False) -> Path:
    """Write ``tensors`` + ``metadata`` (JSON under "hellm") atomically; refuse to replace another dataset's."""
    path = Path(path)
    if path.exists() and not overwrite_other_dataset:
        old = read_metadata(path)
        if old.get("dataset") != dataset_fingerprint:
            raise UsageError(f"{path} was exported from another dataset ({str(old.get('dataset'))[:12]}…); "
                             "refusing to overwrite it")
    meta = {"hellm": json.dumps({**metadata, "dataset": dataset_fingerprint}, sort_keys=True, default=str)}
    return atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                               tmp, metadata=meta))


def check_export_owner(path: str | Path, dataset_fingerprint: str) -> None:
    """Fail before training, not after it, when ``path`` holds an export made from another dataset."""
    path = Path(path)
    if path.exists() and read_metadata(path).get("dataset") != dataset_fingerprint:
        raise UsageError(f"{path} was exported from another dataset; refusing to overwrite it "
                         "(use another --out directory)")


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get("hellm", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataFormatError(path, None, f"unreadable safetensors file ({e})") from None


def load_tensors(path: str | Path, expect: dict[str, tuple] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of an export; ``expect`` maps names to shapes (None = any size in that dim)."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DataFormatError(path, None, f"unreadable safetensors file ({e})") from None
    for name, shape in (expect or {}).items():
        if name not in tensors:
            raise DataFormatError(path, None, f"missing tensor {name!r}", sorted(tensors))
        got = tuple(tensors[name].shape)
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
            raise DataFormatError(path, None, f"tensor {name!r} has shape {got}, expected {shape}")
        if not torch.isfinite(tensors[name]).all():
            raise DataFormatError(path, None, f"tensor {name!r} has non-finite values")
    return tensors, meta
