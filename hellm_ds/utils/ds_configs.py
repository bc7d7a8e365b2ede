"""Find a DeepSpeed JSON config: the shipped ``ds_configs/*.json`` from any working directory and any install.

A path that exists is used as is (a user's own ``ds_configs/zero3.json`` wins). Otherwise
``ds_configs/NAME.json`` (the documented spelling) or a bare ``NAME.json`` is looked up among the copies
installed with the package (``hellm_ds.ds_configs`` package data) and then in the source tree (a checkout),
so ``hellm-ds pipeline`` and ``python -m hellm_ds.train`` find them from any directory.
"""
from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

from hellm_ds.errors import UsageError

SOURCE_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def shipped_configs() -> dict[str, Path]:
    """Name → path of the configs that come with the project (installed copies first, then the source tree)."""
    found: dict[str, Path] = {}
    try:
        installed = importlib.resources.files("hellm_ds.ds_configs")
        for entry in installed.iterdir():
            if entry.name.endswith(".json"):
                found[entry.name] = Path(str(entry))
    except ModuleNotFoundError:
        pass
    if SOURCE_DIR.is_dir():
        for p in SOURCE_DIR.glob("*.json"):
            found.setdefault(p.name, p)
    return found


def resolve_ds_config(path: str | Path, flag: str = "--deepspeed_config") -> Path:
    """The config file ``path`` names (see the module docstring); a UsageError naming the flag otherwise."""
    p = Path(path)
    if p.is_file():
        return p.resolve()
    shipped = shipped_configs()
    if not p.is_absolute() and p.parent in (Path("ds_configs"), Path(".")) and p.name in shipped:
        return shipped[p.name]
    raise UsageError(f"{flag} {path} not found (shipped configs: "
                     f"{', '.join('ds_configs/' + n for n in sorted(shipped)) or 'none'})")


def read_ds_config(path: str | Path, flag: str = "--deepspeed_config") -> tuple[Path, dict]:
    """(resolved path, parsed JSON object); malformed JSON is a UsageError naming the file, line and column."""
    resolved = resolve_ds_config(path, flag)
    try:
        config = json.loads(resolved.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{resolved}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{resolved}: a DeepSpeed config must be a JSON object, got {type(config).__name__}")
    return resolved, config
