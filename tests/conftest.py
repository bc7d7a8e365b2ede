import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed without GPUs: the CPU accelerator (gloo)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels on CPU tensors (before any @triton.jit)

from hellm_ds.data.synth import SynthConfig, write_synthetic

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # kernel tests: the GPU when there is one


@pytest.fixture(scope="session", autouse=True)
def cold_torch_extensions(tmp_path_factory) -> Path:
    """An empty JIT-extension cache for the whole session, inherited by every subprocess: as on CI's fresh
    machine, nothing is found pre-built in ~/.cache/torch_extensions (a DeepSpeed op the trainer compiled
    at start-up once made every stage-2 test time out there while passing on a warm developer machine)."""
    path = tmp_path_factory.mktemp("torch_extensions")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_EXTENSIONS_DIR", str(path))
        yield path


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset directory (the embedded default, shrunk)."""
    return write_synthetic(tmp_path_factory.mktemp("synth") / "data", SynthConfig(users=600, items=150, seed=7))


def require(module: str, extra: str, install: str):
    """Import a declared test dependency or fail — never skip — naming the extra that provides it: a suite
    that skips what its declared dependencies should run passes without testing it. Genuinely optional
    things (the torch_sparse backend, a GPU, ../shared/data) stay skips."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = e  # failed outside the handler: one message, not a chained traceback
    pytest.fail(f"{module} cannot be imported ({error}); these tests declare it as a dependency "
                f"(hellm_ds's `{extra}` extra): {install}", pytrace=False)


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


@pytest.fixture(scope="module")
def tables(synth_dir, tmp_path_factory):
    """(data dir, graph table, SASRec table): random stage-1 item tables for the synthetic dataset (graph d=8,
    SASRec d=6), exported as stage 1 does — the inputs of every stage-2 run."""
    from hellm_ds.data.dataset import load_dataset
    from hellm_ds.data.synth import write_random_item_tables

    graph, seq = write_random_item_tables(load_dataset(synth_dir), tmp_path_factory.mktemp("stage1"))
    return synth_dir, graph, seq


@pytest.fixture(scope="module")
def local_llama(tmp_path_factory) -> Path:
    """A tiny random LLaMA saved as a local HF checkpoint directory (model + offline tokenizer)."""
    from transformers import AutoModelForCausalLM

    from hellm_ds.llm.backbone import build_offline_tokenizer, llama_config
    from hellm_ds.llm.config import MODEL_SIZES, HeLLMConfig

    d = tmp_path_factory.mktemp("tinyllama")
    cfg = HeLLMConfig()
    tok = build_offline_tokenizer([cfg.instruction, cfg.response])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = llama_config(MODEL_SIZES["tiny"], len(tok))
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm.save_pretrained(d)
    tok.save_pretrained(d)
    return d
