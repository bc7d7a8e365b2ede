"""Dataset directories: reading, validation, the leave-one-out split, batching, synthetic data, import.

The names below are loaded on first use, so ``hellm-ds import`` and the readers never import torch
(``batching`` needs it)."""
from __future__ import annotations

import importlib

_WHERE = {
    "NextItemExamples": "batching", "ShardedSampler": "batching", "left_pad": "batching",
    "Dataset": "dataset", "EvalSplit": "dataset", "Modality": "dataset", "TrainSamples": "dataset",
    "load_dataset": "dataset",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"hellm_ds.data.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hellm_ds.data' has no attribute {name!r}")
