"""Shared pieces of every argument parser (``hellm-ds``, the trainer entry, the kernel compile check): a help
formatter that shows each option's default, and ``type=`` validators for values that are checked before any
work starts. Standard library only, so building a parser stays cheap."""
from __future__ import annotations

import argparse
import re
from typing import Callable, Iterable

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help. Skipped for a None default (the text says what None
    means), for on/off flags (a bool default says nothing) and for text that already uses %(default)s."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is argparse.SUPPRESS
                or isinstance(default, bool) or "%(default)" in text):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with ``HelpFormatter``; subparsers inherit the class, hence the
    formatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def device_arg(value: str) -> str:
    """``type=`` for device flags: auto, cpu, cuda or cuda:N."""
    if not _DEVICE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def add_ties_arg(p: argparse.ArgumentParser) -> None:
    """``--ties``: the tie rule of every metric a command reports (imports torch: subcommand parsers only)."""
    from hellm_ds.eval.metrics import TIE_RULES

    p.add_argument("--ties", choices=TIE_RULES, default=TIE_RULES[0],
                   help="how metrics count items scored exactly like the target: expected (mean over random "
                        "tie orders) or optimistic (in the target's favour, as the published numbers)")


def csv_choices(choices: Iterable[str], allow_empty: bool = False) -> Callable[[str], str]:
    """``type=`` for a comma-separated subset of ``choices`` (the string itself is returned). argparse also
    passes a string default through it, hence ``allow_empty`` for a default of ""."""
    allowed = tuple(choices)

    def check(value: str) -> str:
        items = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad or not (items or allow_empty):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(allowed)}, got {value!r}")
        return value

    return check
