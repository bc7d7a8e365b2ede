"""One SpMM with a fused epilogue, three backends (no autograd here; see ``kernels.autograd``):

    out = rs ⊙ (A · (cs ⊙ X)) − c ⊙ Z ;   layer_sum += out        (rs, cs, c, Z, layer_sum optional)

Backends:
- ``triton``: ``kernels.spmm_triton`` — CUDA tensors (CPU tensors too under ``TRITON_INTERPRET=1``, for tests);
  ``triton_tile`` is its tile variant (same results; see that module — the GPU benchmark compares the two);
- ``torch``: ``torch.sparse`` CSR ``@`` (cuSPARSE on GPU, MKL on CPU) plus elementwise ops — the reference;
- ``torch_sparse``: ``torch_sparse.matmul`` when the optional package is installed.
``auto`` (the default) on CUDA tensors probes the candidates — both Triton variants, torch CSR, torch_sparse
when importable — on first use with a key (shape, nnz, dtype, d, device, epilogue): each is checked against
torch CSR on the real matrix and timed, and the fastest correct one is used from then on (``kernels.probe``;
``hellm_kernels.kernel_choices()`` lists every decision and why). On CPU tensors ``auto`` is ``torch``
(no probe) unless ``HELLM_PROBE_ON_CPU=1``: with ``TRITON_INTERPRET=1`` that runs the same probe on CPU
(tests). A forced Triton or torch_sparse backend is verified against torch CSR on first use with a key and
raises ``KernelMismatchError`` on a mismatch.

Operands are checked at this boundary (``kernels.checks``): shapes and devices; outputs written in place
(``out``, ``layer_sum``) must have a unit inner stride (else ``KernelUsageError`` naming the argument);
strided inputs are made contiguous on the Triton path.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from hellm_kernels import probe
from hellm_kernels.checks import check_spmm_args
from hellm_kernels.csr import CSR, sparse_csr_tensor

BACKENDS = ("auto", "triton", "triton_tile", "torch", "torch_sparse")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def torch_sparse_available() -> bool:
    """Importable, not merely installed: torch_sparse also needs torch_scatter built against this torch."""
    try:
        import torch_sparse  # noqa: F401
    except Exception:  # ImportError, or an ABI mismatch surfacing as OSError/RuntimeError
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, X: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown SpMM backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":  # the static default; ``spmm`` probes instead where ``probe.probing_enabled``
        return "triton" if X.is_cuda and triton_available() else "torch"
    if backend in ("triton", "triton_tile"):
        if not triton_available():
            raise RuntimeError(f"backend {backend!r} requested but triton is not installed")
        if not X.is_cuda and not triton_interpreted():
            raise RuntimeError(f"backend {backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                               "tests)")
    if backend == "torch_sparse" and not torch_sparse_available():
        raise RuntimeError("backend 'torch_sparse' requested but torch_sparse cannot be imported (pip install "
                           "torch-scatter torch-sparse --no-build-isolation, against the installed torch)")
    return backend


def _epilogue_torch(Y, row_scale, diag, Z, layer_sum, out):
    if row_scale is not None:
        Y = Y * row_scale.to(Y.dtype)[:, None]
    if diag is not None:
        Y = Y - diag.to(Y.dtype)[:, None] * Z.to(Y.dtype)
    if out is not None:
        out.copy_(Y)
        Y = out
    if layer_sum is not None:
        layer_sum.add_(Y.to(layer_sum.dtype))
    return Y


def _compute_dtype(X: torch.Tensor) -> torch.dtype:
    # cuSPARSE multiplies bf16/fp16 with fp32 accumulation; MKL (CPU) has no half-precision CSR SpMM
    return X.dtype if X.dtype in (torch.float32, torch.float64) or X.is_cuda else torch.float32


def _scaled_input(X, col_scale):
    dt = _compute_dtype(X)
    Xc = X.to(dt)
    return Xc * col_scale.to(dt)[:, None] if col_scale is not None else Xc


def _folded_csr(A: CSR, dtype: torch.dtype, row_scale, col_scale) -> torch.Tensor:
    """torch CSR of diag(rs) · A · diag(cs), cached on A per (dtype, rs, cs): one library SpMM instead of a
    product plus two passes over the dense operands. The scale vectors of an operator live as long as it."""
    if row_scale is None and col_scale is None:
        return A.torch_sparse_csr(dtype)
    key = ("torch_csr_folded", dtype, id(row_scale), id(col_scale))
    hit = A._cache.get(key)
    if hit is not None and hit[0] is row_scale and hit[1] is col_scale:
        return hit[2]
    v = torch.ones(A.nnz, dtype=dtype, device=A.device) if A.values is None else A.values.to(dtype)
    if row_scale is not None:
        v = v * torch.repeat_interleave(row_scale.to(dtype), A.row_nnz())
    if col_scale is not None:
        v = v * col_scale.to(dtype)[A.indices.long()]
    T = sparse_csr_tensor(A.indptr, A.indices, v, A.shape)
    A._cache[key] = (row_scale, col_scale, T)
    return T


def spmm_torch(A: CSR, X, row_scale=None, col_scale=None, diag=None, Z=None, layer_sum=None, out=None):
    dt = _compute_dtype(X)
    Y = _folded_csr(A, dt, row_scale, col_scale) @ X.to(dt)
    return _epilogue_torch(Y, None, diag, Z, layer_sum, out).to(X.dtype)


def spmm_torch_sparse(A: CSR, X, row_scale=None, col_scale=None, diag=None, Z=None, layer_sum=None, out=None):
    import torch_sparse

    if "torch_sparse" not in A._cache:
        A._cache["torch_sparse"] = torch_sparse.SparseTensor(
            rowptr=A.indptr.long(), col=A.indices.long(), value=A.values, sparse_sizes=A.shape, is_sorted=True)
    Xc = _scaled_input(X, col_scale)
    Y = _epilogue_torch(torch_sparse.matmul(A._cache["torch_sparse"], Xc), row_scale, diag, Z, layer_sum, out)
    return Y.to(X.dtype)


def _spmm_triton_rows(A, X, row_scale=None, col_scale=None, diag=None, Z=None, layer_sum=None, out=None):
    from hellm_kernels.spmm_triton import spmm_triton

    return spmm_triton(A, X, row_scale, col_scale, diag, Z, layer_sum, out, variant="rows")


def _spmm_triton_tile(A, X, row_scale=None, col_scale=None, diag=None, Z=None, layer_sum=None, out=None):
    from hellm_kernels.spmm_triton import spmm_triton

    return spmm_triton(A, X, row_scale, col_scale, diag, Z, layer_sum, out, variant="tile")


# backend name → implementation ``fn(A, X, row_scale, col_scale, diag, Z, layer_sum, out)``; tests inject
# wrong, failing or slow kernels here (and list them in AUTO_CANDIDATES) to exercise the probe
IMPLS = {"triton": _spmm_triton_rows, "triton_tile": _spmm_triton_tile, "torch": spmm_torch,
         "torch_sparse": spmm_torch_sparse}
AUTO_CANDIDATES: tuple[str, ...] | None = None  # None: auto_candidates(X)
REFERENCE = "torch"  # the backend every other one is checked against (not verified itself when forced)


def auto_candidates(X: torch.Tensor) -> tuple[str, ...]:
    """What ``auto`` probes: the Triton variants where they can run (CUDA, or CPU under the interpreter),
    torch CSR, and torch_sparse when it imports."""
    if AUTO_CANDIDATES is not None:
        return AUTO_CANDIDATES
    names = ["triton", "triton_tile"] if triton_available() and (X.is_cuda or triton_interpreted()) else []
    names.append("torch")
    if torch_sparse_available():
        names.append("torch_sparse")
    return tuple(names)


def _epilogue_tag(A, row_scale, col_scale, diag, layer_sum) -> str:
    parts = [n for n, t in (("values", A.values), ("rs", row_scale), ("cs", col_scale), ("diag", diag),
                            ("sum", layer_sum)) if t is not None]
    return "+".join(parts) or "plain"


def _reference(A: CSR, X, row_scale, col_scale, diag, Z):
    """``reference(cols)`` for the probe: torch CSR on those columns of X in fp32 (fp64 for fp64 X), and the
    magnitude bound |rs| ⊙ (|A| · (|cs| ⊙ |X|)) + |c| ⊙ |Z| the tolerance scales with."""
    acc = torch.float64 if X.dtype == torch.float64 else torch.float32
    ab = lambda t: None if t is None else t.detach().abs()  # noqa: E731

    def reference(cols: torch.Tensor):
        cols = cols.to(X.device)
        Xc = X.detach()[:, cols].to(acc)
        Zc = None if Z is None else Z.detach()[:, cols].to(acc)
        ref = spmm_torch(A, Xc, row_scale, col_scale, diag, Zc)
        absA = CSR(A.indptr, A.indices, A.shape, None if A.values is None else A.values.detach().abs())
        mag = spmm_torch(absA, Xc.abs(), ab(row_scale), ab(col_scale))
        if diag is not None:
            mag = mag + ab(diag).to(acc)[:, None] * Zc.abs()
        return ref, mag

    return reference


def _auto_backend(A: CSR, X, row_scale, col_scale, diag, Z, layer_sum) -> str:
    epilogue = _epilogue_tag(A, row_scale, col_scale, diag, layer_sum)
    hit = probe.lookup(probe.make_key("spmm", A, X, epilogue), "auto")
    if hit is not None:
        return hit.chosen
    n_rows, d = A.shape[0], X.shape[1]

    def candidate(impl):
        def run(Xp):  # never the caller's out / layer_sum: a scratch running sum when the call has one
            if layer_sum is None:
                return impl(A, Xp, row_scale, col_scale, diag, Z, None, None)
            s = torch.zeros(n_rows, d, dtype=layer_sum.dtype, device=X.device)
            return impl(A, Xp, row_scale, col_scale, diag, Z, s, None), s
        return run

    names = auto_candidates(X)
    unknown = [n for n in names if n not in IMPLS]
    if unknown:
        raise ValueError(f"unknown SpMM candidates {unknown}; known: {sorted(IMPLS)}")
    choice = probe.choose("spmm", A, X, {n: candidate(IMPLS[n]) for n in names},
                          _reference(A, X, row_scale, col_scale, diag, Z), epilogue=epilogue)
    return choice.chosen


def spmm(A: CSR, X: torch.Tensor, row_scale=None, col_scale=None, diag=None, Z=None, layer_sum=None,
         out=None, backend: str = "auto") -> torch.Tensor:
    """Dispatch ``out = rs ⊙ (A · (cs ⊙ X)) − c ⊙ Z`` (and ``layer_sum += out``) to a backend.

    The dtypes are X's (and the outputs'), whatever an enclosing ``torch.autocast`` region says: autocast
    would cast the torch backend's CSR product to bf16, which MKL (CPU) cannot multiply and which would
    make the result depend on the backend; the Triton kernels choose their own accumulation type."""
    check_spmm_args(A, X, row_scale, col_scale, diag, Z, layer_sum, out)
    if torch.is_autocast_enabled(X.device.type):
        with torch.autocast(X.device.type, enabled=False):
            return _spmm(A, X, row_scale, col_scale, diag, Z, layer_sum, out, backend)
    return _spmm(A, X, row_scale, col_scale, diag, Z, layer_sum, out, backend)


def _spmm(A, X, row_scale, col_scale, diag, Z, layer_sum, out, backend):
    probed = backend == "auto" and probe.probing_enabled(X)
    if probed:
        b = _auto_backend(A, X, row_scale, col_scale, diag, Z, layer_sum)
    else:
        b = resolve_backend(backend, X)
    Y = IMPLS[b](A, X, row_scale, col_scale, diag, Z, layer_sum, out)
    if not probed:  # a forced kernel is verified on first use; every decision is recorded once per key
        key = probe.make_key("spmm", A, X, _epilogue_tag(A, row_scale, col_scale, diag, layer_sum))
        if backend != "auto" and b != REFERENCE:
            if probe.VERIFY_FORCED and probe.lookup(key, "forced:" + b) is None:
                probe.verify("spmm", A, X, b, Y, _reference(A, X, row_scale, col_scale, diag, Z),
                             epilogue=key.epilogue)
        else:
            tag = "default" if backend == "auto" else "forced:" + b
            if probe.lookup(key, tag) is None:
                reason = (f"auto on {X.device.type} tensors without probing: {b} (the probe runs on CUDA "
                          "unless HELLM_KERNEL_PROBE=0, on CPU only with HELLM_PROBE_ON_CPU=1)" if backend == "auto"
                          else f"forced (backend={b!r}): the reference itself")
                probe.record(probe.Choice(key, "default" if backend == "auto" else "forced", b, reason, None,
                                          [probe.CandidateResult(b, "unverified")]), tag)
    return Y
