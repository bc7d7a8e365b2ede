"""Atomic file writes: the content goes to a temporary file beside the target, renamed into place, so a
reader (or a crash) sees the old file or the new one, never half of one. Standard library only."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


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
