"""The one exception type for bad user input: it names the file, the line (or row) and the value."""
from __future__ import annotations

from pathlib import Path


_NO_VALUE = object()


class DataFormatError(ValueError):
    """A dataset file is malformed. ``str(err)`` reads ``FILE:LINE: message (value: 'VALUE')``.

    ``line`` is 1-based (for ``.npy`` feature files it is the 1-based row, i.e. the item id); it is ``None``
    when the problem concerns the whole file (a missing file, a wrong shape).
    """

    def __init__(self, path: str | Path, line: int | None, message: str, value: object = _NO_VALUE):
        self.path = str(path)
        self.line = line
        self.message = message
        self.value = None if value is _NO_VALUE else value
        where = self.path if line is None else f"{self.path}:{line}"
        text = f"{where}: {message}"
        if value is not _NO_VALUE:
            text += f" (value: {value!r})"
        super().__init__(text)


class UsageError(ValueError):
    """An argument or configuration value is out of range; the CLI prints it and exits 2."""
