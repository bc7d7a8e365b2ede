"""No top-level name of the repository shadows an installed distribution (the `kernels` incident).

transformers imports Hugging Face's ``kernels`` distribution whenever it is installed; ``python -m``, ``python -c``
and pytest put the repository root first on ``sys.path``, so a package folder at the root with a name an installed
distribution also provides hides that distribution. These checks run in subprocesses whose working directory is
the repository root, the way a user runs the documented commands.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import hellm_ds

REPO = Path(__file__).resolve().parents[1]
OWN_DISTRIBUTION = "hellm_ds"


def run_at_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def root_module_names() -> list[str]:
    """The names a root entry could be imported under (folders and top-level .py files)."""
    names = []
    for entry in sorted(REPO.iterdir()):
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_dir() and entry.name.isidentifier():
            names.append(entry.name)
        elif entry.suffix == ".py" and entry.stem.isidentifier():
            names.append(entry.stem)
    return names


def other_distributions_providing(name: str) -> list[str]:
    """Installed distributions (other than this project) that ship a top-level module ``name``."""
    provided = importlib.metadata.packages_distributions()
    return sorted({d for d in provided.get(name, []) if d.replace("-", "_").lower() != OWN_DISTRIBUTION})


def test_transformers_llama_imports_from_repository_root():
    if not other_distributions_providing("kernels"):
        pytest.skip("Hugging Face's `kernels` distribution is not installed (transformers no longer requires it)")
    p = run_at_root("-c", "import transformers.models.llama.modeling_llama as m; print(m.LlamaForCausalLM.__name__)")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "LlamaForCausalLM"


def test_trainer_help_from_repository_root():
    p = run_at_root("-m", "hellm_ds.train", "--help")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "--deepspeed_config" in p.stdout


def test_no_root_folder_shadows_an_installed_distribution():
    """Every root name that an installed distribution provides resolves to that distribution, not the checkout —
    both as ``python -c`` sees it (cwd first on sys.path) and inside this pytest process (rootdir inserted)."""
    names = root_module_names()
    assert "kernels" in names and "hellm_ds" in names  # the layout the product fixes
    contested = {n: other_distributions_providing(n) for n in names}
    contested = {n: d for n, d in contested.items() if d}
    probe = (
        "import importlib.util, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    s = importlib.util.find_spec(n)\n"
        "    out[n] = [str(p) for p in (s.submodule_search_locations or [s.origin])] if s else []\n"
        "print(json.dumps(out))\n"
    )
    p = run_at_root("-c", probe, *sorted(contested))
    assert p.returncode == 0, p.stderr
    for where, found in (("python -c at the root", json.loads(p.stdout)), ("this pytest process", None)):
        for name, dists in contested.items():
            if found is None:
                spec = importlib.util.find_spec(name)
                locations = [str(x) for x in (spec.submodule_search_locations or [spec.origin])] if spec else []
            else:
                locations = found[name]
            ours = {REPO / name, REPO / f"{name}.py", REPO / name / "__init__.py"}  # (.venv/ may live in REPO)
            inside = [loc for loc in locations if Path(loc).resolve() in ours]
            assert not inside, f"{where}: `import {name}` finds the checkout's {inside}, hiding {dists}"


def test_kernels_folder_is_a_source_root_not_a_package():
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert (REPO / "kernels" / "hellm_kernels" / "__init__.py").is_file()
    p = run_at_root("-c", "import hellm_kernels as k; print(k.__name__, ' '.join(k.BACKENDS))")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[:2] == ["hellm_kernels", "auto"]


def test_no_path_manipulation():
    """hellm_ds is one plain folder: nothing else of the checkout is importable as hellm_ds.<folder>
    (ds_configs/ is, by design, installed as the data package hellm_ds.ds_configs)."""
    assert [Path(p).resolve() for p in hellm_ds.__path__] == [Path(hellm_ds.__file__).resolve().parent]
    for folder in ("tests", "launch", "kernels", "hellm_kernels"):
        assert importlib.util.find_spec(f"hellm_ds.{folder}") is None, folder
