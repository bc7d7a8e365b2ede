"""Compile every Triton specialisation the graph stage launches for a CUDA GPU, on a machine without one.

    hellm-ds cuda-compile --arch 90 [--arch 80] [--cache-dir DIR]  (= python -m hellm_kernels.cuda_compile)

The graph stage's real code paths (U2U / I2I propagation, LightGCN, ``sparse_mm`` with learned values, each
forward and backward, through both kernel variants, in fp32 / bf16 / fp64 at several feature widths, int32
and int64 indices, with hub rows) run on small CPU tensors while every kernel launch is intercepted: its
arguments go through Triton's own binder for the CUDA target (the same type and alignment specialisation a
GPU launch would make) and the resulting specialisation is compiled to a cubin with Triton's bundled
``ptxas``. Nothing executes on a GPU,
so the outputs of the intercepted launches are left unset — this checks compilation, not numbers (those are
checked under ``TRITON_INTERPRET=1`` and on a GPU by ``tests/kernels``).

Prints JSON: per specialisation, registers and spilled bytes (``cuobjdump --dump-resource-usage``), Triton's
shared memory per program, and the PTX's global loads by width (``ld.global.v4.b32`` = 128-bit vector loads
of X). Exit status 1 when any specialisation fails to compile or spills registers. The cubins are written
where Triton keeps its cache (``--cache-dir``, else ``TRITON_CACHE_DIR``, else ``~/.triton/cache``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

from hellm_kernels import probe
from hellm_kernels.errors import KernelUsageError


@dataclass
class CompiledSpec:
    kernel: str
    arch: int
    signature: dict
    constexprs: dict
    width: int = -1
    registers: int = -1
    spill_bytes: int = -1
    global_loads: dict = field(default_factory=dict)
    shared_bytes: int = -1
    seconds: float = 0.0
    error: str | None = None

    def summary(self) -> dict:
        types = sorted({v for v in self.signature.values() if v.startswith("*")})
        flags = {k: v for k, v in self.constexprs.items() if k.startswith(("HAS_", "BLOCK", "GROUP", "ACC"))}
        out = {"kernel": self.kernel, "arch": f"sm_{self.arch}", "pointer_types": types, **flags,
               "width": self.width, "registers": self.registers, "spill_bytes": self.spill_bytes,
               "shared_bytes": self.shared_bytes, "global_loads": self.global_loads,
               "seconds": round(self.seconds, 2)}
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args)`` compiles the launch for each arch."""

    fn: object  # the JITFunction
    archs: tuple[int, ...]
    compiled: dict = field(default_factory=dict)
    binders: dict = field(default_factory=dict)  # arch → (target, backend, binder), built once

    def binder(self, arch: int):
        if arch not in self.binders:
            from triton.backends.compiler import GPUTarget
            from triton.compiler import make_backend
            from triton.runtime.jit import create_function_from_signature

            target = GPUTarget("cuda", arch, 32)
            backend = make_backend(target)
            self.binders[arch] = target, backend, create_function_from_signature(self.fn.signature,
                                                                                  self.fn.params, backend)
        return self.binders[arch]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(args, kwargs)

    def launch(self, args, kwargs):
        import triton
        from triton import knobs

        # the options a GPU launch adds before binding (JITFunction.run), so the specialisation is the same
        kwargs = dict(kwargs, debug=kwargs.get("debug", self.fn.debug) or knobs.runtime.debug)
        for option in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(knobs.compilation, option):
                kwargs[option] = getattr(knobs.compilation, option)
        for arch in self.archs:
            target, backend, binder = self.binder(arch)
            bound, specialization, options = binder(*args, **kwargs)
            key = (arch, repr(specialization), repr(options))
            if key in self.compiled:
                continue
            options, signature, constexprs, attrs = self.fn._pack_args(backend, kwargs, bound, specialization,
                                                                        options)
            names = list(bound)
            spec = CompiledSpec(self.fn.__name__, arch, dict(signature),
                                {names[p[0]]: str(v) for p, v in constexprs.items()}, width=int(bound["D"]))
            t0 = time.perf_counter()
            try:
                src = triton.compiler.ASTSource(self.fn, signature, constexprs, attrs)
                kernel = triton.compile(src, target=target, options=options.__dict__)
                spec.registers, spec.spill_bytes = resource_usage(kernel.asm["cubin"])
                spec.shared_bytes = int(kernel.metadata.shared)  # Triton's dynamic shared memory per program
                loads = Counter(re.findall(r"ld\.global(?:\.\w+)*", kernel.asm["ptx"]))
                spec.global_loads = dict(sorted(loads.items()))
            except Exception as exc:  # report every failing specialisation, not just the first
                last_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
                spec.error = f"{type(exc).__name__}: {last_line}"
            spec.seconds = time.perf_counter() - t0
            self.compiled[key] = spec


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, spilled bytes per thread (local memory)) of a cubin's kernel."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|LOCAL):(\d+)", text))
    return int(fields.get("REG", -1)), int(fields.get("LOCAL", -1))


def sample_operators(index_dtype, seed: int = 0, n_users: int = 70, n_items: int = 40):
    """(R, RT, u2u, i2i, lgcn): a small random user × item incidence R (a hub row holding every column, some
    empty rows) with ``index_dtype`` indices, its transpose, and operators of the three forms the graph stage
    propagates over, built from this package's own types with the same operands and epilogue flags: a U2U
    form (M = R; row scale a, diagonal c, no input scale), an I2I form (M = Rᵀ; a = b, no diagonal) and a
    LightGCN Â (ru, ri = inverse square-root degrees). The scale values are simple degree functions, not
    the graph builders' normalisations (those are ``hellm_ds.graph``'s): enough for compiling and smoke
    tests."""
    import numpy as np
    import torch

    from hellm_kernels.csr import CSR
    from hellm_kernels.operators import BipartiteOperator, TwoStageOperator

    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 6, n_users)
    lengths[3] = n_items  # a hub row, split into segments by a small launch plan
    rows = np.repeat(np.arange(n_users), lengths)
    cols = np.concatenate([rng.choice(n_items, k, replace=False) for k in lengths])
    R32 = CSR.from_coo(rows, cols, (n_users, n_items))
    R = CSR(R32.indptr.to(index_dtype), R32.indices.to(index_dtype), R32.shape)
    RT32 = R.transpose()
    RT = CSR(RT32.indptr.to(index_dtype), RT32.indices.to(index_dtype), RT32.shape)

    def inv_pow(deg: torch.Tensor, p: float) -> torch.Tensor:  # deg^p, 0 where deg = 0; float32
        deg = deg.double()
        return torch.where(deg > 0, deg.clamp_min(1) ** p, torch.zeros_like(deg)).float()

    deg_u, deg_i = R.row_nnz(), RT.row_nnz()
    u2u = TwoStageOperator(R, RT, a=inv_pow(deg_u, -1.0), b=None, c=inv_pow(deg_u, -0.5), name="U2U-form")
    d = inv_pow(deg_i, -0.5)
    i2i = TwoStageOperator(RT, R, a=d, b=d, c=None, name="I2I-form")
    lgcn = BipartiteOperator(R, RT, inv_pow(deg_u, -0.5), d)
    return R, RT, u2u, i2i, lgcn


def exercise_graph_stage(seed: int = 0) -> None:
    """Run every launch path of the graph stage once on small CPU tensors (see module docstring)."""
    import torch

    from hellm_kernels.autograd import lightgcn_propagate, propagate, sparse_mm
    from hellm_kernels.spmm_triton import make_plan

    for index_dtype in (torch.int32, torch.int64):
        R, RT, u2u, i2i, lgcn = sample_operators(index_dtype, seed)
        n_users, n_items = R.shape
        for A in (R, RT):
            A._cache["triton_plan"] = make_plan(A, seg=8)
        full = index_dtype == torch.int32  # every dtype and width once; int64 indices at d = 64 fp32
        widths = (1, 64, 65, 128) if full else (64,)
        dtypes = (torch.float32, torch.bfloat16, torch.float64) if full else (torch.float32,)
        for dtype in dtypes:
            for d in widths:
                for backend in ("triton", "triton_tile"):
                    for op in (u2u, i2i):
                        for combine in ("last", "sum"):
                            X = torch.randn(op.n, d, dtype=dtype, requires_grad=True)
                            propagate(op, X, 2, combine, backend=backend).float().sum().backward()
                    Eu = torch.randn(n_users, d, dtype=dtype, requires_grad=True)
                    Ei = torch.randn(n_items, d, dtype=dtype, requires_grad=True)
                    lgcn_out = lightgcn_propagate(lgcn, Eu, Ei, 2, backend=backend)
                    sum(t.float().sum() for t in lgcn_out).backward()
                    values = torch.rand(R.nnz, dtype=torch.float32, requires_grad=True)
                    Y = sparse_mm(R, Ei.detach().requires_grad_(), RT, row_scale=lgcn.ru, col_scale=lgcn.ri,
                                  values=values, backend=backend)
                    Y.float().sum().backward()


def compile_all(archs: tuple[int, ...]) -> list[CompiledSpec]:
    from triton.runtime.jit import JITFunction

    interpret = os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JITFunctions
    try:
        from hellm_kernels import spmm_triton

        names = ("_spmm_kernel", "_spmm_tile_kernel", "_hub_reduce_kernel")
        if not all(isinstance(getattr(spmm_triton, n), JITFunction) for n in names):
            raise KernelUsageError("the Triton kernels were imported under TRITON_INTERPRET=1 in this "
                                   "process: run the compile check in a fresh process without it")
        recorders = {name: Recorder(getattr(spmm_triton, name), archs) for name in names}
        for name, rec in recorders.items():
            setattr(spmm_triton, name, rec)
        os.environ["TRITON_INTERPRET"] = "1"  # the library routes CPU tensors to the (intercepted) kernels
        verify = probe.VERIFY_FORCED
        probe.VERIFY_FORCED = False  # the intercepted launches leave their outputs unset: nothing to verify
        try:
            exercise_graph_stage()
        finally:
            probe.VERIFY_FORCED = verify
            for name, rec in recorders.items():
                setattr(spmm_triton, name, rec.fn)
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return [spec for rec in recorders.values() for spec in rec.compiled.values()]


def report(archs: tuple[int, ...], cache_dir: str | None = None) -> dict:
    """Compile everything for ``archs``; the JSON report (``failed`` counts errors and spilling kernels)."""
    if cache_dir:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    specs = compile_all(archs)
    failed = [s for s in specs if s.error or s.spill_bytes != 0]
    return {"archs": [f"sm_{a}" for a in archs], "specialisations": len(specs), "failed": len(failed),
            "seconds": round(sum(s.seconds for s in specs), 1), "kernels": [s.summary() for s in specs]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m hellm_kernels.cuda_compile``, and of ``hellm-ds cuda-compile``."""
    p.add_argument("--arch", type=int, action="append",
                   help="CUDA compute capability ×10 (80 = A100, 90 = H100); repeatable; default 90")
    p.add_argument("--cache-dir",
                   help="where Triton writes the kernels (default: TRITON_CACHE_DIR or ~/.triton/cache)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hellm_kernels.cuda_compile",
                                 description=__doc__.split("\n")[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        result = report(tuple(args.arch or [90]), args.cache_dir)
    except KernelUsageError as e:
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    print(json.dumps(result, indent=1))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
