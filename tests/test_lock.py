"""requirements-lock.txt: the exact set launch/setup_env.sh installs, consistent with setup.py's ranges."""
from __future__ import annotations

import ast
import importlib.metadata
import os
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements-lock.txt"


def read_lock(path: Path = LOCK) -> dict[str, Version]:
    pins = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"{path}:{lineno}: not an exact pin: {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def setup_requirements() -> dict[str, list[Requirement]]:
    """install_requires and extras_require of setup.py, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    groups = {"install": kw["install_requires"], **kw["extras_require"]}
    return {g: [Requirement(r) for r in reqs] for g, reqs in groups.items()}


def test_lock_pins_every_requirement_within_setup_py_ranges():
    pins = read_lock()
    reqs = setup_requirements()
    # what the README's commands install: the package, its test extra and encode-text's model (text extra)
    for group in ("install", "test", "text"):
        for req in reqs[group]:
            name = canonicalize_name(req.name)
            assert name in pins, f"{req} ({group}) is not in {LOCK.name}"
            assert req.specifier.contains(pins[name], prereleases=True), f"{LOCK.name} pins {name}=={pins[name]}, outside {req}"


def test_fast_moving_dependencies_are_capped_below_next_major():
    reqs = {canonicalize_name(r.name): r for group in setup_requirements().values() for r in group}
    for name in ("torch", "deepspeed", "transformers", "peft", "triton"):
        assert any(s.operator == "<" for s in reqs[name].specifier), f"{reqs[name]} has no upper bound"


def test_installed_environment_matches_the_lock():
    """The environment the tests run in is the locked one (unless set up with HELLM_NO_LOCK=1)."""
    stamp = Path(os.environ.get("VIRTUAL_ENV", "/nonexistent")) / ".hellm_ds-installed"
    if not stamp.is_file() or stamp.read_text().strip() != "lock":
        pytest.skip("environment not installed from the lock by launch/setup_env.sh")
    mismatched = {}
    for name, version in read_lock().items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            mismatched[name] = (str(version), None)
            continue
        if Version(installed.base_version) != version and installed != version:  # 2.13.0+cpu matches 2.13.0
            mismatched[name] = (str(version), str(installed))
    assert not mismatched, f"installed versions differ from {LOCK.name}: {mismatched}"
