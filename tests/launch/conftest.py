"""Benchmark scripts live in launch/ (not a package): load one as a module for its tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[2] / "launch"


def load_script(name: str):
    """Execute ``launch/<name>.py`` as module ``name`` (registered while loading: dataclasses look their
    module up) and yield it; unregistered afterwards."""
    spec = importlib.util.spec_from_file_location(name, LAUNCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)
