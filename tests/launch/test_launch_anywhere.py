"""`launch/finetune.py` (what `deepspeed`/`torchrun` start) works from any working directory: with the package
installed, and from a checkout that is not installed (it then imports that checkout, not only with
PYTHONPATH=. from the repository root)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "finetune.py"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["DS_ACCELERATOR"] = "cpu"
    return env


def test_help_from_another_directory(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "--trainable-scope" in p.stdout, p.stderr[-2000:]


def test_not_installed_checkout_from_another_directory(tmp_path):
    """The editable install's import hooks removed (as if only the dependencies were installed): the script
    finds its own checkout."""
    code = (
        "import runpy, sys\n"
        "def installed(f): return '__editable__' in getattr(f, '__module__', '')\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if not installed(f)]\n"
        "sys.path_hooks[:] = [h for h in sys.path_hooks if not installed(h)]\n"
        "sys.path_importer_cache.clear()\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('hellm_ds') is None, 'still importable'\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    import hellm_ds\n"
        "    print('EXIT', e.code, hellm_ds.__file__)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"EXIT 0 {ROOT / 'hellm_ds' / '__init__.py'}" in p.stdout, p.stdout[-2000:]
