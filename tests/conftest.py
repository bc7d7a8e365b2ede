import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # DeepSpeed on a machine without GPUs: the CPU accelerator (gloo)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from hellm_ds.data.synth import SynthConfig, write_synthetic

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset directory (the embedded default, shrunk)."""
    return write_synthetic(tmp_path_factory.mktemp("synth") / "data", SynthConfig(users=600, items=150, seed=7))


def shared_dataset(name: str) -> Path:
    path = Path(os.environ.get("HELLM_SHARED_DATA", SHARED_DATA)) / name
    if not (path / "sequences.txt").is_file():
        pytest.skip(f"real dataset {name!r} not present at {path}")
    return path
