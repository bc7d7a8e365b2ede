"""Benchmark the project's sparse propagation kernels (nanoGPT ``bench.py`` style: a table and a JSON file).

What is compared, per graph × feature width d × feature dtype:

- ``spmm``   Y = A·X, A a user×item CSR with row-normalised values (1/deg_u), X [items, d]:
  the project's ``spmm`` (Triton on CUDA; its ``torch`` backend on CPU), ``torch`` CSR ``@`` (cuSPARSE on
  CUDA, MKL on CPU), ``torch.sparse.mm`` on COO, and ``torch_sparse.matmul`` when that package is installed;
- ``u2u``    one layer of the user hypergraph U2U = rownorm(R Rᵀ − diag), both stages
  (``propagate(user_hypergraph(R), X_u, 1, "last")``), project backend vs the same two stages on torch CSR
  (cuSPARSE), torch_sparse, and the materialised R Rᵀ form (one CSR SpMM) when it fits a nnz budget;
- ``i2i``    the same for the item hypergraph H Hᵀ of a real dataset directory (``--data``).

Graphs: synthetic power-law bipartite graphs (``power_law_bipartite``: Zipf item popularity, heavy-tailed
user degrees, no duplicate pairs) and real dataset directories (``--data DIR``, built with ``build_graphs``).
Metrics: median ms over ``--repeats`` (CUDA events on GPU, ``time.perf_counter`` on CPU, after warm-up),
effective GB/s = a floor of the bytes the product must move / time, that as a % of a device-to-device copy
measured in the same run, the floor time (floor bytes / copy bandwidth), speed-up vs torch CSR (cuSPARSE),
peak memory (GPU: ``torch.cuda.max_memory_allocated`` per method, and its excess over what was resident
before it; CPU: the process's max RSS), and a correctness guard: every method's result is compared with a
float32 torch CSR reference and marked ``BAD`` when its max relative error exceeds the dtype's tolerance.

Run (GPU: paper sizes, 1M×300k×16M and 10M×2M×160M, d 64,128, fp32 and bf16, 20 repeats):

    PYTHONPATH=. python launch/bench_kernels.py --data ../shared/data/toys --out runs/bench/kernels.json

On a CPU-only machine the defaults drop to ``--sizes small`` and 5 repeats (a couple of minutes on 2 cores):

    python launch/bench_kernels.py --device cpu --sizes small

Options: ``--device cuda|cpu``, ``--data DIR [DIR ...]`` (repeatable), ``--sizes tiny|small|paper|none``
or explicit ``UxIxNNZ`` specs (``1e6x3e5x1.6e7,...``), ``--dims 64,128``, ``--dtypes fp32,bf16``,
``--repeats N``, ``--warmup N``, ``--out FILE`` (default ``bench_kernels.json``), ``--seed``,
``--user-alpha``/``--item-alpha`` (power-law exponents), ``--mat-budget`` (max estimated nnz of a
materialised R Rᵀ), ``--knn-k`` (item hypergraph of ``--data``), ``--triton-interpret`` (run the Triton
kernels on CPU; needs ``TRITON_INTERPRET=1`` in the environment and tiny sizes — the interpreter is very
slow), ``--threads N`` (torch CPU threads; ``--threads 1`` gives steadier CPU timings on a shared machine),
``--quiet`` (JSON only).

The JSON shares the shape of the project's other benchmarks: a header (``benchmark``, ``date``, ``device``,
``torch``, ``triton``, ``copy_gbps``, ...) and ``results``: one record per case, each with ``name``,
``params``, ``metrics``, ``status`` (``ok`` | ``oom`` | ``error`` | ``skipped``) and ``note``; plus
``summary``, the target ratios (reported, never asserted): project SpMM ≥ 1.3× cuSPARSE at d=64 fp32 and
≥ 2× with bf16 features on the synthetic graphs; one U2U layer (both stages) ≤ 2 cuSPARSE SpMMs' time.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# a plain checkout (not installed): its two source roots, the repository (hellm_ds) and kernels/ (hellm_kernels),
# each added only when that package is not importable already
for _name, _src in (("hellm_ds", REPO_ROOT), ("hellm_kernels", REPO_ROOT / "kernels")):
    if importlib.util.find_spec(_name) is None:
        sys.path.append(str(_src))

from hellm_ds.utils.bench import device_name, fmt_cell, max_rss_mb, sync  # noqa: E402

SIZE_PRESETS: dict[str, list[tuple[int, int, int]]] = {
    "tiny": [(2_000, 600, 16_000), (500, 200, 3_000)],  # tests
    "small": [(100_000, 30_000, 1_600_000), (20_000, 6_000, 160_000)],  # CPU default
    "paper": [(1_000_000, 300_000, 16_000_000), (10_000_000, 2_000_000, 160_000_000)],  # GPU default
    "none": [],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# max |Y − ref| / max |ref| against a float32 torch-CSR reference; half precision stores intermediates rounded
TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
MAT_BUDGET = {"cuda": 2e8, "cpu": 2e7}  # max estimated nnz of a materialised R Rᵀ / H Hᵀ
COPY_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
TARGET_SPMM = {torch.float32: 1.3, torch.bfloat16: 2.0}
TARGET_U2U_OVER_SPMM = 2.0


# ---- project imports --------------------------------------------------------------------------------------
@functools.cache
def project() -> types.SimpleNamespace:
    """The project's API, importable from an installed package or from a plain checkout on PYTHONPATH."""
    from hellm_ds.data.dataset import load_dataset
    from hellm_ds.graph.build import GraphConfig, build_graphs
    from hellm_ds.graph.operators import item_hypergraph, user_hypergraph
    from hellm_kernels.autograd import propagate
    from hellm_kernels.csr import CSR, index_dtype
    from hellm_kernels.spmm import spmm, torch_sparse_available, triton_available, triton_interpreted

    return types.SimpleNamespace(
        load_dataset=load_dataset, GraphConfig=GraphConfig, build_graphs=build_graphs, CSR=CSR,
        index_dtype=index_dtype, item_hypergraph=item_hypergraph, user_hypergraph=user_hypergraph,
        propagate=propagate, spmm=spmm, torch_sparse_available=torch_sparse_available,
        triton_available=triton_available, triton_interpreted=triton_interpreted)


# ---- graphs -----------------------------------------------------------------------------------------------
def _zipf_cdf(n: int, alpha: float, device: torch.device) -> torch.Tensor:
    w = torch.arange(1, n + 1, dtype=torch.float64, device=device).pow_(-alpha)
    cdf = torch.cumsum(w, 0)
    return cdf.div_(cdf[-1].item())


def _zipf_draw(cdf: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(k, generator=gen, device=cdf.device, dtype=torch.float64)
    return torch.searchsorted(cdf, u).clamp_(max=cdf.numel() - 1)


def power_law_bipartite(n_users: int, n_items: int, nnz: int, seed: int = 0, device="cpu",
                        user_alpha: float = 0.6, item_alpha: float = 0.8, chunk: int = 1 << 25):
    """A binary users × items CSR with ``nnz`` distinct (u, i) pairs, Zipf-like on both sides.

    User u (after a random relabelling) is drawn with probability ∝ rank^-user_alpha, item i ∝
    rank^-item_alpha, independently; pairs are deduplicated by sorting the int64 key u·n_items + i
    (``torch.unique``), topped up until there are ≥ nnz of them, and a uniform random subset of exactly
    ``nnz`` is kept. Everything runs on ``device`` in chunks of ``chunk`` draws (160M non-zeros take a few
    GB of GPU memory). Indices are int32 when they fit; ``values`` is None (use ``row_normalised``).
    """
    P = project()
    device = torch.device(device)
    if not (0 < nnz <= n_users * n_items // 2):
        raise ValueError(f"nnz must be in (0, users·items/2], got {nnz} for {n_users}×{n_items}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    ucdf, icdf = _zipf_cdf(n_users, user_alpha, device), _zipf_cdf(n_items, item_alpha, device)
    uperm = torch.randperm(n_users, generator=gen, device=device)  # popularity rank → id: hubs anywhere
    iperm = torch.randperm(n_items, generator=gen, device=device)
    keys = torch.empty(0, dtype=torch.int64, device=device)
    over = 1.1  # draws per missing pair; re-estimated from each round's yield of new pairs
    for _ in range(40):
        missing = nnz - keys.numel()
        if missing <= 0:
            break
        m = int(missing * over) + 64
        parts = [keys]
        for lo in range(0, m, chunk):
            k = min(chunk, m - lo)
            u = uperm[_zipf_draw(ucdf, k, gen)]
            u.mul_(n_items).add_(iperm[_zipf_draw(icdf, k, gen)])
            parts.append(u)
            del u
        prev = keys.numel()
        keys = torch.unique(torch.cat(parts))  # sorted: row-major order, columns sorted within rows
        del parts
        over = min(1.05 * m / max(keys.numel() - prev, 1), 100.0)
    del ucdf, icdf, uperm, iperm
    if keys.numel() > nnz:
        keep = torch.randperm(keys.numel(), generator=gen, device=device)[:nnz]
        keys = keys[keep.sort().values]
        del keep
    rows = torch.div(keys, n_items, rounding_mode="floor")
    cols = keys.sub_(rows * n_items)
    counts = torch.bincount(rows, minlength=n_users)
    del rows
    indptr = torch.zeros(n_users + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=indptr[1:])
    dt = P.index_dtype(cols.numel(), (n_users, n_items))
    return P.CSR(indptr.to(dt), cols.to(dt), (n_users, n_items))


def row_normalised(R):
    """R with values 1/deg_u (float32), sharing R's index arrays — the plain-SpMM operand."""
    P = project()
    deg = R.row_nnz()
    rows = torch.repeat_interleave(torch.arange(R.shape[0], device=R.device), deg)
    inv = torch.where(deg > 0, 1.0 / deg.clamp_min(1).double(), 0.0).float()
    return P.CSR(R.indptr, R.indices, R.shape, inv[rows].contiguous())


def parse_sizes(spec: str) -> list[tuple[int, int, int]]:
    if spec in SIZE_PRESETS:
        return list(SIZE_PRESETS[spec])
    out = []
    for part in spec.split(","):
        try:
            u, i, n = (int(float(x)) for x in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--sizes: {part!r} is neither a preset {sorted(SIZE_PRESETS)} nor USERSxITEMSxNNZ") from None
        out.append((u, i, n))
    return out


def _short(n: float) -> str:
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            v = n / div
            return f"{v:.0f}{suf}" if v == int(v) else f"{v:.3g}{suf}"
    return str(int(n))


# ---- measurement ------------------------------------------------------------------------------------------
def time_ms(fn: Callable, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Per-call times in ms: CUDA events on GPU, ``time.perf_counter`` on CPU, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Device-to-device copy, (read + write bytes) / time, in GB/s."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    ms = statistics.median(time_ms(lambda src=src, dst=dst: dst.copy_(src), device, max(repeats, 5), 2))
    del src, dst
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


class MemoryProbe:
    """Peak memory of one call: GPU max allocated (and its excess over what was resident, i.e. the call's
    output and temporaries; caches built by an earlier call are resident); CPU max RSS."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _rss_mb()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.metrics = {"peak_mb": peak / 2**20, "peak_extra_mb": (peak - self.base) / 2**20,
                            "peak_kind": "cuda_max_allocated"}
        else:
            self.metrics = {"peak_mb": max_rss_mb(), "rss_delta_mb": _rss_mb() - self.base,
                            "peak_kind": "process_maxrss"}
        return False


def rel_err(Y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |Y − ref| / max |ref| (inf on shape mismatch or non-finite values)."""
    if tuple(Y.shape) != tuple(ref.shape):
        return math.inf
    scale = ref.abs().max().item() if ref.numel() else 0.0
    diff = (Y.to(ref.dtype) - ref).abs().max().item() if ref.numel() else 0.0
    if not math.isfinite(diff):
        return math.inf
    return diff / max(scale, 1e-30)


def spmm_floor_bytes(A, d: int, elt: int, extra_rows_read: int = 0) -> int:
    """Bytes any SpMM must move: indices, values, indptr (4 B/row), X read once, Y written once."""
    idx = A.indices.element_size() * A.nnz
    val = 0 if A.values is None else A.values.element_size() * A.nnz
    return idx + val + 4 * (A.shape[0] + 1) + elt * d * (A.shape[1] + A.shape[0] + extra_rows_read)


def two_stage_floor_bytes(op, d: int, elt: int) -> int:
    """Both stages: Mᵀ·X then M·(stage 1) with the diagonal term reading X again, plus the scale vectors."""
    z_rows = op.M.shape[0] if op.c is not None else 0
    b = spmm_floor_bytes(op.MT, d, elt) + spmm_floor_bytes(op.M, d, elt, z_rows)
    return b + sum(4 * v.numel() for v in (op.a, op.b, op.c) if v is not None)


# ---- benchmark cases --------------------------------------------------------------------------------------
@dataclass
class Method:
    name: str
    fn: Callable[[], torch.Tensor]
    note: str = ""
    # (fn, note) used when ``fn`` raises (a library without a kernel for the dtype)
    fallback: tuple[Callable[[], torch.Tensor], str] | None = None


@dataclass
class Bench:
    device: torch.device
    repeats: int
    warmup: int
    copy_gbps: float
    records: list = field(default_factory=list)
    printer: Callable[[dict], None] = print

    def run_case(self, case: str, graph: str, shape: tuple[int, int], nnz: int, d: int, dtype: torch.dtype,
                 ref: torch.Tensor, methods: list[Method], floor_bytes: int, baseline: str,
                 extra_params: dict | None = None) -> list[dict]:
        """Time every method, check it against ``ref``, and derive GB/s and speed-ups vs ``baseline``."""
        out = []
        for m in methods:
            rec = self._run_method(case, graph, shape, nnz, d, dtype, ref, m, floor_bytes, extra_params)
            out.append(rec)
        base = next((r for r in out if r["params"]["method"] == baseline and r["status"] == "ok"), None)
        for r in out:
            if base is not None and r["status"] == "ok":
                r["metrics"]["speedup_vs_cusparse"] = base["metrics"]["ms"] / r["metrics"]["ms"]
            self.records.append(r)
            self.printer(r)
        return out

    def _run_method(self, case, graph, shape, nnz, d, dtype, ref, m: Method, floor_bytes, extra_params):
        dname = DTYPE_NAMES[dtype]
        params = {"case": case, "graph": graph, "rows": shape[0], "cols": shape[1], "nnz": nnz, "d": d,
                  "dtype": dname, "method": m.name, "device": self.device.type, **(extra_params or {})}
        rec = {"name": f"{case}/{graph}/d{d}/{dname}/{m.name}", "params": params, "metrics": {},
               "status": "ok", "note": m.note}
        fn, tol = m.fn, TOLERANCE[dtype]
        try:
            with torch.no_grad():  # the first call builds the caches (COO copy, bf16 CSR, plan); Y checked
                try:
                    Y = fn()
                except (torch.OutOfMemoryError, KeyboardInterrupt):
                    raise
                except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
                    if m.fallback is None:
                        raise
                    fn, note = m.fallback
                    rec["note"] = f"{note} ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
                    Y = fn()
                sync(self.device)
                err = rel_err(Y, ref)
                del Y
                _free(self.device)
                with MemoryProbe(self.device) as probe:  # one call's working memory, the check excluded
                    fn()
                    sync(self.device)
                _free(self.device)
                times = time_ms(fn, self.device, self.repeats, self.warmup)
        except torch.OutOfMemoryError as e:
            rec["status"], rec["note"] = "oom", str(e).splitlines()[0][:160]
            _free(self.device)
            return rec
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
            rec["status"], rec["note"] = "error", f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            _free(self.device)
            return rec
        ms = statistics.median(times)
        floor_ms = floor_bytes / (self.copy_gbps * 1e9) * 1e3
        rec["metrics"] = {
            "ms": ms, "ms_min": min(times), "ms_max": max(times), "repeats": len(times),
            "floor_bytes": floor_bytes, "floor_ms": floor_ms,
            "gbps": floor_bytes / (ms * 1e-3) / 1e9, "pct_copy_bw": 100.0 * floor_ms / ms,
            "max_rel_err": err, "tolerance": tol, "correct": err <= tol, **probe.metrics,
        }
        return rec

    def skip(self, case, graph, shape, nnz, d, dtype, method, status, note, extra_params=None):
        dname = DTYPE_NAMES[dtype]
        params = {"case": case, "graph": graph, "rows": shape[0], "cols": shape[1], "nnz": nnz, "d": d,
                  "dtype": dname, "method": method, "device": self.device.type, **(extra_params or {})}
        rec = {"name": f"{case}/{graph}/d{d}/{dname}/{method}", "params": params, "metrics": {},
               "status": status, "note": note}
        self.records.append(rec)
        self.printer(rec)
        return rec


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _dtype_fallback(make: Callable[[torch.dtype], Callable[[], torch.Tensor]], dtype: torch.dtype,
                    label: str):
    """(fn, note) computing in float32 when a library has no kernel for a half-precision dtype."""
    if dtype in (torch.float32, torch.float64):
        return None
    note = f"{label} has no {DTYPE_NAMES[dtype]} kernel here: timed in fp32 (X cast once)"
    return make(torch.float32), note


def _coo(A, dtype):
    key = ("bench_coo", dtype)
    if key not in A._cache:
        A._cache[key] = A.torch_sparse_csr(dtype).to_sparse_coo().coalesce()
    return A._cache[key]


def _torch_sparse_tensor(A):
    import torch_sparse

    key = "bench_torch_sparse"
    if key not in A._cache:
        A._cache[key] = torch_sparse.SparseTensor(rowptr=A.indptr.long(), col=A.indices.long(),
                                                  value=A.values, sparse_sizes=A.shape, is_sorted=True)
    return A._cache[key]


def spmm_methods(A, X: torch.Tensor, project_backend: str, dtype: torch.dtype) -> list[Method]:
    P = project()
    Xf = {}  # X cast to float32 once, for libraries without half-precision kernels

    def xf(dt):
        if dt not in Xf:
            Xf[dt] = X if X.dtype == dt else X.to(dt)
        return Xf[dt]

    def csr(dt):
        return lambda: A.torch_sparse_csr(dt) @ xf(dt)

    def coo(dt):
        def run():
            try:
                return torch.sparse.mm(_coo(A, dt), xf(dt))
            except (RuntimeError, NotImplementedError):  # no kernel for dt: drop the copy (GBs at 10⁸ nnz)
                A._cache.pop(("bench_coo", dt), None)
                raise
        return run

    methods = [
        Method(f"project[{project_backend}]", lambda: P.spmm(A, X, backend=project_backend)),
        *([Method("project[triton_tile]", lambda: P.spmm(A, X, backend="triton_tile"), "the tile variant")]
          if project_backend == "triton" else []),
        Method("torch_csr", csr(dtype), "cuSPARSE" if X.is_cuda else "MKL / native CPU",
               _dtype_fallback(csr, dtype, "torch CSR @")),
        Method("torch_coo", coo(dtype), "torch.sparse.mm on coalesced COO",
               _dtype_fallback(coo, dtype, "torch COO")),
    ]
    if P.torch_sparse_available():
        import torch_sparse

        def ts(dt):
            return lambda: torch_sparse.matmul(_torch_sparse_tensor(A), xf(dt))

        methods.append(Method("torch_sparse", ts(dtype), "torch_sparse.matmul",
                              _dtype_fallback(ts, dtype, "torch_sparse")))
    return methods


def materialise(op, budget: float):
    """(the operator as one CSR matrix, estimate): M Mᵀ by a sparse·sparse matmul on the device, scaled, the
    diagonal term applied; the matrix is None when the estimated nnz Σ_cols deg² (the multiply-adds, ≥ the
    true nnz) exceeds ``budget``."""
    est = int((op.MT.row_nnz().double() ** 2).sum().item())
    if est > budget:
        return None, est
    M, MT = op.M.torch_sparse_csr(torch.float32), op.MT.torch_sparse_csr(torch.float32)
    try:
        S = M @ MT
    except (RuntimeError, NotImplementedError):
        S = torch.sparse.mm(M.to_sparse_coo(), MT.to_sparse_coo()).coalesce().to_sparse_csr()
    crow, col, val = S.crow_indices(), S.col_indices().long(), S.values().double()
    del S
    n = op.n
    rows = torch.repeat_interleave(torch.arange(n, device=val.device), crow[1:] - crow[:-1])
    if op.a is not None:
        val *= op.a.double()[rows]
    if op.b is not None:
        val *= op.b.double()[col]
    keep = val != 0
    if op.c is not None:
        on_diag = rows == col
        c = op.c.double()
        has = torch.zeros(n, dtype=torch.bool, device=val.device)
        has[rows[on_diag]] = True
        if bool(((c != 0) & ~has).any()):
            raise RuntimeError("materialise: a diagonal term falls outside M Mᵀ's pattern")
        val[on_diag] -= c[rows[on_diag]]
        # U2U removes the diagonal exactly in exact arithmetic: drop what is left of it (rounding)
        keep &= ~(on_diag & (val.abs() <= 1e-5 * c[rows].abs()))
    rows, col, val = rows[keep], col[keep], val[keep].float()
    counts = torch.bincount(rows, minlength=n)
    indptr = torch.zeros(n + 1, dtype=torch.int64, device=val.device)
    torch.cumsum(counts, 0, out=indptr[1:])
    dt = project().index_dtype(val.numel(), (n, n))
    return project().CSR(indptr.to(dt), col.to(dt), (n, n), val), est


# ---- per-graph drivers ------------------------------------------------------------------------------------
@dataclass
class Config:
    device: torch.device
    dims: list[int]
    dtypes: list[torch.dtype]
    project_backend: str
    mat_budget: float
    seed: int


def bench_spmm(bench: Bench, cfg: Config, graph: str, A, gen: torch.Generator):
    rows, cols = A.shape
    for d in cfg.dims:
        for dtype in cfg.dtypes:
            try:
                X = torch.randn(cols, d, device=cfg.device, generator=gen).to(dtype)
                ref = A.torch_sparse_csr(torch.float32) @ X.float()
            except torch.OutOfMemoryError as e:
                bench.skip("spmm", graph, A.shape, A.nnz, d, dtype, "*", "oom", str(e).splitlines()[0][:160])
                _free(cfg.device)
                continue
            floor = spmm_floor_bytes(A, d, X.element_size())
            bench.run_case("spmm", graph, A.shape, A.nnz, d, dtype, ref,
                           spmm_methods(A, X, cfg.project_backend, dtype), floor, "torch_csr")
            del X, ref
            _free(cfg.device)


def bench_two_stage(bench: Bench, cfg: Config, case: str, graph: str, op, gen: torch.Generator):
    """One layer of a two-stage hypergraph operator: project vs torch CSR two-stage vs materialised."""
    P = project()
    n, nnz = op.n, op.M.nnz
    extra = {"stage_nnz": nnz, "inner": op.M.shape[1]}
    try:
        mat, est = materialise(op, cfg.mat_budget)
        mat_note = "" if mat is None else f"materialised nnz {mat.nnz} (estimate ≤ {est})"
    except torch.OutOfMemoryError as e:
        mat, est, mat_note = None, -1, f"OOM while materialising: {str(e).splitlines()[0][:100]}"
    except (RuntimeError, NotImplementedError) as e:
        first = str(e).splitlines()[0][:100] if str(e) else ""
        mat, est, mat_note = None, -1, f"materialising failed: {type(e).__name__}: {first}"
    _free(cfg.device)
    for d in cfg.dims:
        for dtype in cfg.dtypes:
            try:
                X = torch.randn(n, d, device=cfg.device, generator=gen).to(dtype)
                with torch.no_grad():
                    ref = P.propagate(op, X.float(), 1, "last", backend="torch")
            except torch.OutOfMemoryError as e:
                bench.skip(case, graph, (n, n), nnz, d, dtype, "*", "oom", str(e).splitlines()[0][:160],
                           extra)
                _free(cfg.device)
                continue
            methods = [
                Method(f"project[{cfg.project_backend}]",
                       lambda X=X: P.propagate(op, X, 1, "last", backend=cfg.project_backend),
                       "both stages, 1 layer"),
                *([Method("project[triton_tile]",
                          lambda X=X: P.propagate(op, X, 1, "last", backend="triton_tile"),
                          "both stages, 1 layer, the tile variant")]
                  if cfg.project_backend == "triton" else []),
                Method("torch_csr", lambda X=X: P.propagate(op, X, 1, "last", backend="torch"),
                       "two stages on " + ("cuSPARSE" if X.is_cuda else "MKL / native CPU")),
            ]
            if P.torch_sparse_available():
                methods.append(Method("torch_sparse",
                                      lambda X=X: P.propagate(op, X, 1, "last", backend="torch_sparse")))
            if mat is not None:
                def mat_fn(dt, mat=mat, X=X):
                    Xc = X if X.dtype == dt else X.to(dt)
                    return lambda: mat.torch_sparse_csr(dt) @ Xc
                methods.append(Method("materialised", mat_fn(dtype), mat_note,
                                      _dtype_fallback(mat_fn, dtype, "torch CSR @")))
            floor = two_stage_floor_bytes(op, d, X.element_size())
            bench.run_case(case, graph, (n, n), nnz, d, dtype, ref, methods, floor, "torch_csr", extra)
            recs = bench.records
            if mat is not None:  # the materialised form moves other bytes: its own floor
                mfloor = spmm_floor_bytes(mat, d, X.element_size())
                for r in recs[-len(methods):]:
                    if r["params"]["method"] == "materialised" and r["status"] == "ok":
                        m = r["metrics"]
                        m["floor_bytes"], m["floor_ms"] = mfloor, mfloor / (bench.copy_gbps * 1e9) * 1e3
                        m["gbps"] = mfloor / (m["ms"] * 1e-3) / 1e9
                        m["pct_copy_bw"] = 100.0 * m["floor_ms"] / m["ms"]
                        r["params"]["materialised_nnz"] = mat.nnz
            else:
                note = (mat_note or f"skipped (would need up to {est:.3g} nnz > budget {cfg.mat_budget:.3g})")
                bench.skip(case, graph, (n, n), nnz, d, dtype, "materialised", "skipped", note,
                           {**extra, "estimated_nnz": est})
            del X, ref, methods
            _free(cfg.device)
    del mat
    _free(cfg.device)


def bench_synthetic(bench: Bench, cfg: Config, size: tuple[int, int, int], user_alpha: float,
                    item_alpha: float, log: Callable[[str], None]):
    P = project()
    u, i, n = size
    graph = f"powerlaw-{_short(u)}x{_short(i)}-{_short(n)}"
    t0 = time.perf_counter()
    R = power_law_bipartite(u, i, n, cfg.seed, cfg.device, user_alpha, item_alpha)
    RT = R.transpose()  # on R's device
    op = P.user_hypergraph(R, RT)
    A = row_normalised(R)
    sync(cfg.device)
    du, di = R.row_nnz(), RT.row_nnz()
    log(f"# {graph}: built in {time.perf_counter() - t0:.1f}s, nnz {R.nnz}, user degree max {int(du.max())} "
        f"mean {du.float().mean().item():.1f}, item degree max {int(di.max())} "
        f"mean {di.float().mean().item():.1f}")
    gen = torch.Generator(device=cfg.device)
    gen.manual_seed(cfg.seed + 1)
    bench_spmm(bench, cfg, graph, A, gen)
    del A
    _free(cfg.device)
    bench_two_stage(bench, cfg, "u2u", graph, op, gen)
    del R, RT, op
    _free(cfg.device)


def bench_dataset(bench: Bench, cfg: Config, path: str, knn_k: int, log: Callable[[str], None]):
    P = project()
    graph = "data:" + Path(path).resolve().name
    t0 = time.perf_counter()
    ds = P.load_dataset(path)
    g = P.build_graphs(ds, P.GraphConfig(knn_k=knn_k), device=str(cfg.device))
    R, RT = g.R.to(cfg.device), g.RT.to(cfg.device)
    log(f"# {graph}: {R.shape[0]} users × {R.shape[1]} items, nnz {R.nnz}; graphs built in "
        f"{time.perf_counter() - t0:.1f}s")
    gen = torch.Generator(device=cfg.device)
    gen.manual_seed(cfg.seed + 1)
    bench_spmm(bench, cfg, graph, row_normalised(R), gen)
    bench_two_stage(bench, cfg, "u2u", graph, P.user_hypergraph(R, RT), gen)
    if g.H is not None:
        H, HT = g.H.to(cfg.device), g.HT.to(cfg.device)
        bench_two_stage(bench, cfg, "i2i", graph, P.item_hypergraph(H, HT), gen)
    else:
        for d in cfg.dims:
            for dtype in cfg.dtypes:
                bench.skip("i2i", graph, (R.shape[1], R.shape[1]), 0, d, dtype, "*", "skipped",
                           "the dataset has no item modality")
    del g, R, RT
    _free(cfg.device)


# ---- reporting --------------------------------------------------------------------------------------------
COLUMNS = [("graph", 22, "<"), ("case", 4, "<"), ("rows×cols", 13, ">"), ("nnz", 7, ">"), ("d", 4, ">"),
           ("dtype", 5, "<"), ("method", 15, "<"), ("ms", 9, ">"), ("GB/s", 7, ">"), ("%copy", 6, ">"),
           ("floor ms", 8, ">"), ("vs cuSP", 7, ">"), ("peak MB", 9, ">"), ("check", 5, "<")]


def table_header(device: torch.device) -> str:
    head = " ".join(f"{name:{al}{w}}" for name, w, al in COLUMNS)
    mem = "peak MB = GPU max allocated during the method" if device.type == "cuda" else \
        "peak MB = process max RSS (CPU)"
    return f"{head}\n{'-' * len(head)}   [{mem}; vs cuSP = speed-up vs torch CSR]"


def table_row(rec: dict) -> str:
    p, m = rec["params"], rec["metrics"]
    ok = rec["status"] == "ok"
    if ok:
        check = "ok" if m.get("correct") else "BAD"
    else:
        check = ""
    cells = [p["graph"][:22], p["case"], f"{_short(p['rows'])}×{_short(p['cols'])}", _short(p["nnz"]),
             str(p["d"]), p["dtype"], p["method"][:15]]
    if ok:
        cells += [fmt_cell(m["ms"], ".3f"), fmt_cell(m["gbps"], ".1f"), fmt_cell(m["pct_copy_bw"], ".1f"),
                  fmt_cell(m["floor_ms"], ".3f"), fmt_cell(m.get("speedup_vs_cusparse"), ".2f"),
                  fmt_cell(m["peak_mb"], ".0f"), check]
        line = " ".join(f"{c:{al}{w}}" for c, (_, w, al) in zip(cells, COLUMNS))
        if not m.get("correct"):
            line += f"  !! max rel err {m['max_rel_err']:.2e} > {m['tolerance']:.0e}"
        elif rec.get("note") and "fp32" in rec["note"]:
            line += "  (fp32: no half-precision kernel)"
        return line
    line = " ".join(f"{c:{al}{w}}" for c, (_, w, al) in zip(cells, COLUMNS[:7]))
    return f"{line} {rec['status'].upper()}: {rec['note']}"


def summarise(records: list[dict]) -> list[dict]:
    """The target ratios (reported, not asserted) per graph."""
    ok = {tuple(r["params"][k] for k in ("case", "graph", "d", "dtype", "method")): r
          for r in records if r["status"] == "ok"}

    def project_recs(case, g, d, dn):  # each project variant timed (project[triton], project[triton_tile])
        return [r for k, r in ok.items() if k[:4] == (case, g, d, dn) and k[4].startswith("project")]

    out = []
    graphs = list(dict.fromkeys(r["params"]["graph"] for r in records))
    for g in graphs:
        for dtype, target in TARGET_SPMM.items():
            dn = DTYPE_NAMES[dtype]
            base = ok.get(("spmm", g, 64, dn, "torch_csr"))
            for proj in project_recs("spmm", g, 64, dn) if base else []:
                v = base["metrics"]["ms"] / proj["metrics"]["ms"]
                what = f"{proj['params']['method']} SpMM vs cuSPARSE, d=64 {dn} (speed-up)"
                out.append({"graph": g, "what": what, "value": v, "target": f">= {target}",
                            "met": v >= target, "correct": bool(proj["metrics"]["correct"]),
                            "baseline_note": base.get("note", "")})
        for d in sorted({r["params"]["d"] for r in records if r["params"]["graph"] == g}):
            for dn in ("fp32", "bf16"):
                base = ok.get(("spmm", g, d, dn, "torch_csr"))
                for proj in project_recs("u2u", g, d, dn) if base else []:
                    v = proj["metrics"]["ms"] / base["metrics"]["ms"]
                    what = f"U2U 1 layer {proj['params']['method']} / cuSPARSE SpMM, d={d} {dn}"
                    out.append({"graph": g, "what": what, "value": v, "target": f"<= {TARGET_U2U_OVER_SPMM}",
                                "met": v <= TARGET_U2U_OVER_SPMM,
                                "correct": bool(proj["metrics"]["correct"])})
    return out


def summary_line(s: dict) -> str:
    mark = "met" if s["met"] else "NOT met"
    bad = "" if s["correct"] else "  !! project result failed the correctness check"
    unit = "×" if "speed-up" in s["what"] else ""
    return f"  {s['graph']:<22} {s['what']:<62} {s['value']:7.2f}{unit}  (target {s['target']}: {mark}){bad}"


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def command_line(script, argv):
    from hellm_ds.utils.bench import command_line as _command_line  # imported late (see write_json)

    return _command_line(script, argv)


def write_json(path: Path, header: dict, records: list[dict], summary: list[dict]) -> None:
    from hellm_ds.utils.bench import write_bench_json  # imported late: the script may set up sys.path first

    write_bench_json(path, header, records, summary)


# ---- command line -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_kernels.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="default: cuda when available, else cpu")
    ap.add_argument("--data", action="append", nargs="+", default=[], metavar="DIR",
                    help="real dataset directories (sequences.txt, ...); repeatable")
    ap.add_argument("--sizes", default=None,
                    help="synthetic graphs: tiny | small | paper | none, or USERSxITEMSxNNZ[,...] "
                         "(default: paper on cuda, small on cpu)")
    ap.add_argument("--dims", default="64,128", help="feature widths, comma-separated")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"feature dtypes from {sorted(DTYPES)}")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls per method (default 20 cuda, 5 cpu)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 3 cuda, 1 cpu)")
    ap.add_argument("--out", default="bench_kernels.json", help="JSON results file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--user-alpha", type=float, default=0.6, help="power-law exponent of user activity")
    ap.add_argument("--item-alpha", type=float, default=0.8, help="power-law exponent of item popularity")
    ap.add_argument("--mat-budget", type=float, default=None,
                    help="max estimated nnz of a materialised R Rᵀ / H Hᵀ (default 2e8 cuda, 2e7 cpu)")
    ap.add_argument("--knn-k", type=int, default=10, help="k of the item kNN hypergraph for --data")
    ap.add_argument("--triton-interpret", action="store_true",
                    help="run the Triton kernels on CPU (needs TRITON_INTERPRET=1; tiny sizes only)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--quiet", action="store_true", help="no table on stdout (JSON only)")
    return ap


def _csv(s: str, conv, what: str) -> list:
    try:
        vals = [conv(x.strip()) for x in s.split(",") if x.strip()]
    except (KeyError, ValueError):
        raise SystemExit(f"bench_kernels.py: error: bad {what} list {s!r}") from None
    if not vals:
        raise SystemExit(f"bench_kernels.py: error: empty {what} list")
    return vals


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    P = project()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py: error: --device cuda but torch sees no GPU")
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_gpu = device.type == "cuda"
    sizes = parse_sizes(args.sizes or ("paper" if on_gpu else "small"))
    dims = _csv(args.dims, int, "--dims")
    dtypes = _csv(args.dtypes, lambda x: DTYPES[x], "--dtypes")
    repeats = args.repeats if args.repeats is not None else (20 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    datas = [d for group in args.data for d in group]

    notes = []
    if on_gpu:
        if P.triton_available():
            backend = "triton"
        else:
            backend = "torch"
            notes.append("triton is not installed: the project backend is 'torch'")
    elif args.triton_interpret:
        if not (P.triton_available() and P.triton_interpreted()):
            raise SystemExit("bench_kernels.py: error: --triton-interpret needs triton and "
                             "TRITON_INTERPRET=1 in the environment (set before the kernels are imported)")
        backend = "triton"
    else:
        backend = "torch"
        notes.append("CPU: project backend 'torch' (Triton's interpreter is far too slow; "
                     "see --triton-interpret)")

    out_path = Path(args.out)
    quiet = args.quiet

    def log(s: str) -> None:
        if not quiet:
            print(s, flush=True)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*(beta|invariant).*")
        copy_gbps = copy_bandwidth(device, COPY_BYTES[device.type], repeats)
        header = {
            "benchmark": "kernels", "command": command_line(__file__, argv),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": triton_version(), "cuda": torch.version.cuda if on_gpu else None,
            "python": platform.python_version(), "host_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "copy_gbps": copy_gbps, "copy_bytes": COPY_BYTES[device.type], "project_backend": backend,
            "config": {"sizes": [list(s) for s in sizes], "data": datas, "dims": dims,
                       "dtypes": [DTYPE_NAMES[t] for t in dtypes], "repeats": repeats, "warmup": warmup,
                       "seed": args.seed, "user_alpha": args.user_alpha, "item_alpha": args.item_alpha,
                       "mat_budget": args.mat_budget or MAT_BUDGET[device.type], "knn_k": args.knn_k},
            "notes": notes,
        }
        log(f"# kernels benchmark on {header['device']} (torch {header['torch']}, "
            f"triton {header['triton']}); "
            f"device-to-device copy {copy_gbps:.1f} GB/s; project backend '{backend}'")
        for n in notes:
            log(f"# note: {n}")
        log(table_header(device))
        bench = Bench(device, repeats, warmup, copy_gbps, printer=lambda r: log(table_row(r)))
        cfg = Config(device, dims, dtypes, backend, args.mat_budget or MAT_BUDGET[device.type], args.seed)
        # one graph failing (OOM, a bad --data directory, a library error) must not end an unattended run
        jobs = [("data:" + Path(p).resolve().name, (0, 0, 0),
                 functools.partial(bench_dataset, bench, cfg, p, args.knn_k, log)) for p in datas]
        jobs += [(f"powerlaw-{_short(u)}x{_short(i)}-{_short(n)}", (u, i, n),
                  functools.partial(bench_synthetic, bench, cfg, (u, i, n), args.user_alpha, args.item_alpha,
                                    log))
                 for u, i, n in sizes]
        for graph, (u, i, n), job in jobs:
            try:
                job()
            except torch.OutOfMemoryError as e:
                bench.skip("graph", graph, (u, i), n, 0, torch.float32, "*", "oom",
                           str(e).splitlines()[0][:160])
            except Exception as e:  # noqa: BLE001 — recorded in the JSON and on stdout, then the next graph
                bench.skip("graph", graph, (u, i), n, 0, torch.float32, "*", "error",
                           f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            _free(device)
            write_json(out_path, header, bench.records, summarise(bench.records))
    summary = summarise(bench.records)
    write_json(out_path, header, bench.records, summary)
    bad = [r["name"] for r in bench.records if r["status"] == "ok" and not r["metrics"].get("correct")]
    log("\n# targets (ratios reported, not asserted)")
    for s in summary:
        log(summary_line(s))
    if bad:
        log(f"# WARNING: {len(bad)} result(s) failed the correctness check: {', '.join(bad[:5])}")
    log(f"# results: {out_path}")
    return {**header, "results": bench.records, "summary": summary}


if __name__ == "__main__":
    main()
