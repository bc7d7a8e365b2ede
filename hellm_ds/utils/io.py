"""Atomic file writes: the content goes to a temporary file beside the target, renamed into place, so a
reader (or a crash) sees the old file or the new one, never half of one; and ``removed_if_left_empty``, so a
failed command leaves no empty output directory behind. Standard library only."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def strict_json(obj):
    """``obj`` with every non-finite float (NaN, ±Infinity) replaced by None: JSON has neither, and strict
    parsers (jq, most languages) refuse Python's ``NaN``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


@contextlib.contextmanager
def new_directory(out: str | Path, overwrite: bool = False):
    """Yield a temporary sibling of ``out`` to fill; on success it replaces ``out`` whole (a dataset appears
    complete or not at all), on an error it is removed. A non-empty ``out`` is refused unless ``overwrite``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """``write(tmp_path)`` then ``os.replace`` onto ``path``; the temporary file is removed if ``write``
    raises (so ``write`` may also check, last, whether the replacement should still happen)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj) -> Path:
    """``obj`` (a str as is, else JSON) written to ``path`` atomically."""
    text = obj if isinstance(obj, str) else json.dumps(obj, indent=1, default=str)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@contextlib.contextmanager
def removed_if_left_empty(path: str | Path | None):
    """Around a command that writes into the output directory ``path``: when the body fails (any exception,
    Ctrl-C included) and left ``path`` holding no file, the directories it created are removed again — the
    topmost folder of ``path`` that did not exist before, with the empty folders under it. A directory that
    existed before, or one that holds a file, is never touched. ``None``: no output directory."""
    if path is None:
        yield
        return
    top = Path(path).absolute()
    if top.exists():
        yield
        return
    while not top.parent.exists():
        top = top.parent
    try:
        yield
    except BaseException:
        if top.is_dir() and not any(p.is_file() or p.is_symlink() for p in top.rglob("*")):
            shutil.rmtree(top, ignore_errors=True)
        raise
