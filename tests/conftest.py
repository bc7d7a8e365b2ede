import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed without GPUs: the CPU accelerator (gloo)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (before any @triton.jit)

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


def random_csr(rows, cols, density, seed, hub_row=None, empty_rows=(), values=False, index_dtype=None):
    """A random CSR with duplicate-free columns, optional hub row (all columns) and empty rows; + dense."""
    from hellm_ds.graph.csr import CSR

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    if hub_row is not None:
        mask[hub_row] = True
    for r in empty_rows:
        mask[r] = False
    r, c = mask.nonzero(as_tuple=True)
    vals = torch.rand(r.numel(), generator=g, dtype=torch.float64) + 0.5 if values else None
    A = CSR.from_coo(r.numpy(), c.numpy(), (rows, cols), None if vals is None else vals.numpy())
    if index_dtype is not None:
        A = CSR(A.indptr.to(index_dtype), A.indices.to(index_dtype), A.shape, A.values)
    dense = torch.zeros(rows, cols, dtype=torch.float64)
    dense[r, c] = vals if values else 1.0
    return A, dense
