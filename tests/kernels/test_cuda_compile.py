"""The Triton kernels compile for real CUDA targets (sm_80, sm_90) on this GPU-less machine: every
specialisation the graph stage launches, without register spills, and with 128-bit loads of X at d = 64."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]


def _ptxas_available() -> bool:
    """Triton itself is a declared test dependency (missing: fail); its CUDA backend with the bundled ptxas
    is in every PyPI wheel but not in every build (a ROCm one): without it, skip."""
    require("triton", "test", "pip install -e .[test]")
    spec = importlib.util.find_spec("triton.backends.nvidia")
    return spec is not None and (Path(spec.origin).parent / "bin" / "ptxas").is_file()


@pytest.mark.skipif(not _ptxas_available(), reason="triton's CUDA backend (bundled ptxas) not installed")
def test_every_launched_specialisation_compiles_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JITFunctions in the child
    cmd = [sys.executable, "-m", "hellm_ds", "cuda-compile", "--arch", "80", "--arch", "90",
           "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = json.loads(proc.stdout)
    errors = [k for k in report["kernels"] if "error" in k or k["spill_bytes"] != 0]
    assert proc.returncode == 0 and not errors, (errors or proc.stderr[-3000:])
    kernels = report["kernels"]
    assert report["archs"] == ["sm_80", "sm_90"] and report["failed"] == 0
    assert {k["arch"] for k in kernels} == {"sm_80", "sm_90"}
    assert {k["kernel"] for k in kernels} == {"_spmm_kernel", "_spmm_tile_kernel", "_hub_reduce_kernel"}
    # the paths that were exercised: every dtype and width, both index widths, all epilogue flags
    spmm = [k for k in kernels if k["kernel"] in ("_spmm_kernel", "_spmm_tile_kernel")]
    assert {k["width"] for k in spmm} == {1, 64, 65, 128}
    assert {k["ACC"] for k in spmm} == {"fp32", "fp64"}
    assert any("*bf16" in k["pointer_types"] for k in spmm)
    assert any("*i32" not in k["pointer_types"] for k in spmm)  # int64 indices
    for flag in ("HAS_VALUES", "HAS_COL_SCALE", "HAS_ROW_SCALE", "HAS_DIAG", "HAS_SUM"):
        assert {k[flag] for k in spmm} == {"True", "False"}, flag
    # X rows of 64 or 128 values are 16-byte aligned: the gathers must be 128-bit vector loads
    aligned = [k for k in spmm if k["width"] in (64, 128) and k["ACC"] == "fp32"]
    assert aligned and all(k["global_loads"].get("ld.global.v4.b32", 0) >= 4 for k in aligned), aligned
    assert all(0 < k["registers"] <= 128 for k in kernels)  # ≥ 4 programs of 4 warps resident per SM
    assert {k["kernel"] for k in aligned} == {"_spmm_kernel", "_spmm_tile_kernel"}


def test_refused_in_a_process_that_interprets_the_kernels(capsys):
    """Under TRITON_INTERPRET=1 (this test process on a CPU machine) the kernels are not compilable objects:
    one clear error instead of an obscure failure per launch — the kernel package's own error, which
    ``hellm-ds cuda-compile`` reports as a usage error (exit 2)."""
    import importlib

    from hellm_ds.cli import main
    from hellm_kernels import cuda_compile
    from hellm_kernels.errors import KernelUsageError

    spmm_triton = importlib.import_module("hellm_kernels.spmm_triton")
    from triton.runtime.jit import JITFunction

    if isinstance(spmm_triton._spmm_kernel, JITFunction):
        pytest.skip("kernels are compiled JITFunctions in this process (no TRITON_INTERPRET)")
    before = os.environ.get("TRITON_INTERPRET")
    with pytest.raises(KernelUsageError, match="fresh process"):
        cuda_compile.report((90,))
    assert os.environ.get("TRITON_INTERPRET") == before  # the caller's setting is restored
    assert main(["cuda-compile", "--arch", "90"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hellm-ds: error: the Triton kernels were imported under TRITON_INTERPRET=1 in this "
                          "process: run the compile check in a fresh process without it"), err
    assert os.environ.get("TRITON_INTERPRET") == before


def test_setup_py_triton_range_is_the_tested_one():
    """The compile check drives private Triton APIs (``cuda_compile.Recorder``): setup.py's ``test`` extra
    admits exactly the Triton minor it is tested with — the installed one, which is also the lock's pin."""
    import re

    from packaging.requirements import Requirement
    from packaging.version import Version

    triton = require("triton", "test", "pip install -e .[test]")
    specs = re.findall(r'"(triton[<>=!~][^"]*)"', (ROOT / "setup.py").read_text())
    assert len(specs) == 1, specs
    spec = Requirement(specs[0]).specifier
    installed = Version(triton.__version__)
    assert installed in spec, (str(spec), str(installed))
    lock = re.search(r"^triton==(\S+)$", (ROOT / "requirements-lock.txt").read_text(), re.M)
    assert lock and Version(lock.group(1)) in spec
    # one minor only: the next one is not admitted until this test (and the compile check) ran with it
    assert Version(f"{installed.major}.{installed.minor + 1}.0") not in spec
    assert Version(f"{installed.major}.{installed.minor}.99") in spec
