"""Progress output for humans, on stderr (stdout carries a command's one JSON object).

A tqdm bar redraws itself with carriage returns: on a terminal that is one line that moves, in a file or a
pipe (a redirected run, the pipeline's launcher log) it is a new copy of the bar for every step. So
``progress_bar`` draws only when stderr is a terminal, and training loops report each epoch with one plain
``progress_line`` whether or not it is one.
"""
from __future__ import annotations

import sys


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def progress_bar(iterable=None, *, desc: str, enabled: bool = True, **kwargs):
    """``tqdm(iterable, desc=desc, …)`` on stderr, drawn only when ``enabled`` and stderr is a terminal. A
    bar that is not drawn still iterates and takes ``update``/``set_postfix``/``close``; ``leave`` defaults
    to False (the epoch's ``progress_line`` is what stays)."""
    from tqdm import tqdm

    kwargs.setdefault("leave", False)
    return tqdm(iterable, desc=desc, file=sys.stderr, disable=not (enabled and stderr_is_terminal()),
                **kwargs)


def progress_line(message: str, enabled: bool = True) -> None:
    """One plain line on stderr (e.g. an epoch's summary); through tqdm, so a live bar is not torn."""
    if enabled:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
