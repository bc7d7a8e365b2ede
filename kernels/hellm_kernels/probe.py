"""Kernel choice that verifies itself: ``backend="auto"`` probes the candidates on the real matrix.

The first time an operator is used with a given key — (op, rows, cols, nnz, dtype, d, device, epilogue) —
``choose`` runs every candidate kernel once on the real operands and compares a few columns of its output
with the pure-PyTorch reference beside it (torch CSR ``@``: cuSPARSE on GPU, MKL on CPU, computed in fp32 —
fp64 for fp64 inputs — from the same operands); times the candidates that agree on the real shapes (a few
warm runs each, interleaved, CUDA-synchronised; like cuDNN's benchmark mode) and keeps the fastest correct
one for the rest of the process. A candidate that raises (a Triton compile error included) or disagrees is
never chosen and is reported once per (op, candidate, status, dtype, device) with a ``KernelProbeWarning``;
every decision is kept, with its reason, for the caller's run log and result JSON:

    hellm_kernels.kernel_choices()   → [{"op": "spmm", "n_rows": …, "n_cols": …, "nnz": …, "dtype": "float32",
                                         "d": 64, "device": "cuda:0", "epilogue": "rs+cs+sum",
                                         "mode": "probed" | "forced" | "default", "chosen": "triton_tile",
                                         "reason": "…", "tolerance": 1e-4,
                                         "candidates": [{"name": "triton", "status": "correct" | "wrong" |
                                                         "error" | "unverified", "ms": 0.05 | null,
                                                         "max_error": 3e-8 | null, "detail": "…"}, …]}, …]
    hellm_kernels.reset_kernel_choices()   forget every choice (tests; a new process starts empty anyway)

A forced backend (``backend="triton"`` …) is not probed but verified: its output on first use with a key is
compared with the reference the same way and a mismatch raises ``KernelMismatchError`` (a loud failure, never
a silent fallback). ``hellm_kernels.spmm`` wires its backends into this module; ``choose`` and ``verify`` are
generic (candidates are plain callables) so tests inject wrong, failing and slow kernels through the same
code path.

Where the probe runs: CUDA tensors always (set ``HELLM_KERNEL_PROBE=0`` to skip it: ``auto`` then means
Triton on CUDA, as before). CPU tensors only when ``HELLM_PROBE_ON_CPU=1`` (or ``probe.PROBE_ON_CPU =
True``): with ``TRITON_INTERPRET=1`` the Triton kernels then take part on CPU, which is how the tests run
this very code path without a GPU; otherwise ``auto`` on CPU is torch CSR (MKL) without probing.

Tolerance (``TOLERANCES``, by the dtype of X). The criterion is elementwise
``|Y − ref| ≤ tol · mag`` with ``mag = |rs| ⊙ (|A| · (|cs| ⊙ |X|)) + |c| ⊙ |Z|`` — the classic error bound of
a sum of products, scaled by the sum of the terms' magnitudes, so cancellation (the U2U diagonal term) does
not make a correct kernel look wrong:
- fp32, tol 1e-4: accumulation-order differences between cuSPARSE and Triton (blocked sums, hub segments)
  are ≈ √k·2⁻²⁴ relative to ``mag`` for k non-zeros per row: 1e-5 at k = 10⁴, 1.2e-4 only for a
  million-non-zero row summed serially, which neither backend does; an error of 1 % anywhere is caught.
- bf16, tol 1e-2: a correct kernel accumulates in fp32 and rounds once, on the store (≤ ½ ulp = 2⁻⁹ ≈ 2e-3
  relative); torch's CSR in bf16 also rounds the folded scale products to bf16 (another ≤ 2⁻⁹ per term),
  together ≤ 2⁻⁸ ≈ 3.9e-3 · mag. 1e-2 leaves 2.5× margin and still catches dropped or doubled rows,
  wrong columns and scale errors above 1 %. fp16: the same with 2⁻¹¹ → 4e-3. fp64: 1e-10.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import torch

log = logging.getLogger("hellm_kernels")

PROBE_ON_CPU = False  # tests: probe CPU tensors too (with TRITON_INTERPRET=1 the Triton kernels take part)
VERIFY_FORCED = True  # verify a forced backend on first use (the CUDA compile check turns it off)
COLUMNS = 8  # columns of X compared with the reference (all of them when d ≤ COLUMNS)
WARMUP = 2  # untimed runs after the checked one
RUNS = 5  # timed runs per candidate (interleaved); the median counts
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 4e-3}


class KernelMismatchError(RuntimeError):
    """A forced kernel's output disagrees with the torch reference (or no candidate agrees at all)."""


class KernelProbeWarning(RuntimeWarning):
    """A candidate kernel failed or disagreed during a probe and is not used."""


@dataclass
class CandidateResult:
    name: str
    status: str  # "correct" | "wrong" | "error" | "unverified"
    ms: float | None = None  # median of the timed runs (correct candidates of a probe)
    max_error: float | None = None  # max |Y − ref| / mag over the checked entries (compare with tolerance)
    detail: str = ""


@dataclass(frozen=True)
class ProbeKey:
    op: str
    n_rows: int
    n_cols: int
    nnz: int
    dtype: str
    d: int
    device: str
    epilogue: str = ""


@dataclass
class Choice:
    key: ProbeKey
    mode: str  # "probed" (auto), "forced" (an explicit backend), "default" (auto without probing)
    chosen: str
    reason: str
    tolerance: float | None = None
    candidates: list[CandidateResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        """Plain JSON (no NaN/Infinity: an unmeasurable error is null, its detail says why)."""
        cands = [{**asdict(c), "max_error": c.max_error if c.max_error is None or math.isfinite(c.max_error)
                  else None} for c in self.candidates]
        return {**asdict(self.key), "mode": self.mode, "chosen": self.chosen, "reason": self.reason,
                "tolerance": self.tolerance, "candidates": cands}


_LOCK = threading.RLock()
_CHOICES: dict[tuple, Choice] = {}
_WARNED: set[tuple] = set()


def kernel_choices() -> list[dict]:
    """Every kernel decision of this process so far, JSON-serialisable, in the order they were made."""
    with _LOCK:
        return [c.as_dict() for c in _CHOICES.values()]


def reset_kernel_choices() -> None:
    """Forget every choice and every warning already given (the next use of each key probes again)."""
    with _LOCK:
        _CHOICES.clear()
        _WARNED.clear()


def probing_enabled(X: torch.Tensor) -> bool:
    if X.is_cuda:
        return os.environ.get("HELLM_KERNEL_PROBE", "1") not in ("0", "")
    return PROBE_ON_CPU or os.environ.get("HELLM_PROBE_ON_CPU", "0") not in ("0", "")


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES.get(dtype, 1e-2)


def make_key(op: str, A, X: torch.Tensor, epilogue: str = "") -> ProbeKey:
    return ProbeKey(op, int(A.shape[0]), int(A.shape[1]), int(A.nnz), str(X.dtype).removeprefix("torch."),
                    int(X.shape[1]), str(X.device), epilogue)


def lookup(key: ProbeKey, mode: str) -> Choice | None:
    return _CHOICES.get((key, mode))


def record(choice: Choice, mode_tag: str) -> Choice:
    """Keep a decision made without probing (a forced torch backend, ``auto`` on CPU)."""
    with _LOCK:
        return _CHOICES.setdefault((choice.key, mode_tag), choice)


def sample_columns(d: int, k: int = COLUMNS) -> torch.Tensor:
    """All columns when d ≤ k; else k spread over the width, first and last included (every Triton column
    block of a wide X is hit when d ≤ 128·k)."""
    if d <= k:
        return torch.arange(d)
    return torch.linspace(0, d - 1, k).round().long().unique()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _outputs(y) -> tuple[torch.Tensor, ...]:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _compare(y, cols: torch.Tensor, ref: torch.Tensor, mag: torch.Tensor, tol: float,
             shape: tuple[int, int]) -> tuple[bool, float, str]:
    """(agrees, max |Y − ref| / mag, detail) over the checked columns of every output of a candidate."""
    worst, detail = 0.0, ""
    tiny = torch.finfo(ref.dtype).tiny
    for i, t in enumerate(_outputs(y)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            return False, float("inf"), f"output {i} is {got}, expected shape {list(shape)}"
        got = t[:, cols.to(t.device)].to(ref.dtype)
        err = (got - ref).abs()
        ratio = torch.where(err == 0, torch.zeros_like(err), err / (mag + tiny))
        ratio = torch.nan_to_num(ratio, nan=float("inf"))
        m = float(ratio.max()) if ratio.numel() else 0.0
        if m > worst:
            worst = m
            if m > tol:
                r, c = divmod(int(ratio.argmax()), ratio.shape[1])
                detail = (f"output {i} row {r} column {int(cols[c])}: {float(got[r, c]):.6g} vs reference "
                          f"{float(ref[r, c]):.6g} (|error| {float(err[r, c]):.3g} > tolerance {tol:g} × "
                          f"magnitude {float(mag[r, c]):.3g})")
    return worst <= tol, worst, detail


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


def _warn_once(key: ProbeKey, res: CandidateResult) -> None:
    tag = (key.op, res.name, res.status, key.dtype, key.device)
    if tag in _WARNED:
        return
    _WARNED.add(tag)
    msg = (f"hellm_kernels: kernel {res.name!r} is not used for {key.op} ({key.n_rows}×{key.n_cols}, "
           f"nnz {key.nnz}, {key.dtype}, d={key.d}, {key.device}): {res.status} — {res.detail} "
           "(every decision: hellm_kernels.kernel_choices())")
    log.warning(msg)
    warnings.warn(msg, KernelProbeWarning, stacklevel=4)


def _reference(reference, cols):
    out = reference(cols)
    ref, mag = out if isinstance(out, tuple) else (out, out.abs())
    return ref, mag


def choose(op: str, A, X: torch.Tensor, candidates: Mapping[str, Callable[[torch.Tensor], object]],
           reference: Callable[[torch.Tensor], object], *, epilogue: str = "", columns: int | None = None,
           warmup: int | None = None, runs: int | None = None) -> Choice:
    """The fastest candidate whose output agrees with ``reference`` — probed once per key, then cached.

    ``candidates``: name → ``fn(X)`` returning the full output [rows, d] (or a tuple of such outputs, each
    compared); ``reference(cols)``: the exact output on those columns of X, in fp32/fp64, or a pair
    (output, magnitude bound) — see the module docstring for the tolerance. Raises ``KernelMismatchError``
    when no candidate agrees.
    """
    key = make_key(op, A, X, epilogue)
    with _LOCK:
        hit = _CHOICES.get((key, "auto"))
        if hit is not None:
            return hit
        choice = _probe(key, X, candidates, reference, COLUMNS if columns is None else columns,
                        WARMUP if warmup is None else warmup, RUNS if runs is None else runs)
        _CHOICES[(key, "auto")] = choice
    log.info("kernel choice %s: %s (%s)", key, choice.chosen, choice.reason)
    return choice


def _probe(key, X, candidates, reference, columns, warmup, runs) -> Choice:
    tol = tolerance(X.dtype)
    cols = sample_columns(X.shape[1], columns)
    results: dict[str, CandidateResult] = {}
    with torch.no_grad():
        ref, mag = _reference(reference, cols)
        for name, fn in candidates.items():
            try:
                y = fn(X)  # the first run compiles; its output is the one checked
                _sync(X.device)
                ok, err, detail = _compare(y, cols, ref, mag, tol, (key.n_rows, key.d))
                results[name] = CandidateResult(name, "correct" if ok else "wrong", max_error=err, detail=detail)
                del y  # one candidate's output alive at a time (a large graph's outputs are GBs)
            except Exception as exc:  # a compile error, an unsupported shape, …: never chosen
                results[name] = CandidateResult(name, "error", detail=_short(exc))
        correct = [n for n, r in results.items() if r.status == "correct"]
        times: dict[str, list[float]] = {n: [] for n in correct}
        if len(correct) > 1:
            def run(n: str, timed: bool) -> None:
                if results[n].status != "correct":
                    return
                try:
                    t0 = time.perf_counter()
                    candidates[n](X)
                    _sync(X.device)
                    if timed:
                        times[n].append((time.perf_counter() - t0) * 1e3)
                except Exception as exc:  # e.g. out of memory on a later run: not used either
                    results[n].status, results[n].detail = "error", "while timing: " + _short(exc)

            for _ in range(warmup):
                for n in correct:
                    run(n, False)
            for _ in range(runs):  # interleaved: a load spike on a shared machine hits every candidate
                for n in correct:
                    run(n, True)
            correct = [n for n in correct if results[n].status == "correct"]
            for n in correct:
                results[n].ms = round(statistics.median(times[n]), 4) if times[n] else None
        for r in results.values():
            if r.status != "correct":
                _warn_once(key, r)
        if not correct:
            raise KernelMismatchError(
                f"no kernel agrees with the torch reference for {key}: "
                + "; ".join(f"{r.name}: {r.status} {r.detail}" for r in results.values()))
    timed = [n for n in correct if results[n].ms is not None]
    if len(correct) == 1 or not timed:
        chosen = correct[0]
        reason = (f"the only candidate that agrees with the torch reference (tolerance {tol:g})" if len(correct) == 1
                  else f"the first of the candidates that agree with the torch reference (tolerance {tol:g}); "
                       "not timed")
    else:
        chosen = min(timed, key=lambda n: results[n].ms)
        ranking = ", ".join(f"{n} {results[n].ms:.4g} ms" for n in sorted(timed, key=lambda n: results[n].ms))
        reason = f"fastest of the candidates that agree with the torch reference (tolerance {tol:g}): {ranking}"
    rejected = [f"{r.name} {r.status}" for r in results.values() if r.status != "correct"]
    if rejected:
        reason += "; rejected: " + ", ".join(rejected)
    return Choice(key, "probed", chosen, reason, tol, list(results.values()))


def verify(op: str, A, X: torch.Tensor, name: str, y, reference: Callable[[torch.Tensor], object], *,
           epilogue: str = "", columns: int | None = None) -> Choice | None:
    """Check a forced kernel's output ``y`` (of this very call) on first use with its key; a mismatch
    raises ``KernelMismatchError``. Later calls with the key are not checked again."""
    if not VERIFY_FORCED:
        return None
    key = make_key(op, A, X, epilogue)
    tag = "forced:" + name
    hit = _CHOICES.get((key, tag))
    if hit is not None:
        return hit
    tol = tolerance(X.dtype)
    cols = sample_columns(X.shape[1], COLUMNS if columns is None else columns)
    with torch.no_grad():
        _sync(X.device)
        ref, mag = _reference(reference, cols)
        ok, err, detail = _compare(y, cols, ref, mag, tol, (key.n_rows, key.d))
    if not ok:
        raise KernelMismatchError(
            f"backend {name!r} was forced but its {op} output disagrees with the torch reference for "
            f"{key}: {detail}. Use backend='auto' (which skips a kernel that disagrees) or 'torch'.")
    res = CandidateResult(name, "correct", max_error=err)
    return record(Choice(key, "forced", name, f"forced (backend={name!r}); its first output agrees with the "
                                                  f"torch reference (tolerance {tol:g})", tol, [res]), tag)
