"""What DeepSpeed and torch may print during fine-tuning, and what of it a human sees (``--verbose``: all).

Nothing here acts at import: the entry points that run DeepSpeed (the trainer's ``main``, ``hellm-ds
finetune``) call ``configure_deepspeed_output``; ``hellm-ds pipeline`` shows the lines of its launcher's
output that ``launcher_line_shown`` lets through (all of them stay in ``RUN/finetune/launcher.log``).
"""
from __future__ import annotations

import logging
import re
import sys
import warnings

# torch 2.13 deprecates the collectives DeepSpeed 0.19 calls in every ZeRO step (parameter all-gather,
# gradient reduce-scatter); the warning names torch's replacement, nothing a user of this package can act on
DEPRECATED_COLLECTIVES = (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor"
                          r"|_all_gather_base|_reduce_scatter_base)` (is deprecated|is a private function)")
# attributed to torch's c10d wrapper (c10d_logger), or to DeepSpeed's caller for the unwrapped private ones
_WARNING_MODULE = r"(torch\.distributed|deepspeed)\."


def configure_deepspeed_output(verbose: bool = False) -> None:
    """DeepSpeed's logger at WARNING (``verbose``: INFO) and on stderr, and the FutureWarnings torch raises
    for DeepSpeed's collectives hidden (``verbose``: each shown once per process). Imports DeepSpeed."""
    # "once", not the default once-per-location: every change to the filters (each subprocess.Popen makes
    # one) resets the per-location registries, and DeepSpeed's CPU accelerator may start `numactl` per step
    warnings.filterwarnings("once" if verbose else "ignore", message=DEPRECATED_COLLECTIVES,
                            category=FutureWarning, module=_WARNING_MODULE)
    from deepspeed.utils import logger

    level = logging.INFO if verbose else logging.WARNING
    logger.setLevel(level)
    for handler in logger.handlers:
        handler.setLevel(level)
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setStream(sys.stderr)  # DeepSpeed logs to stdout, which carries a command's JSON


# lines of the fine-tuning launcher's output that only the log keeps (single lines: none of them continues)
_LAUNCHER_CHATTER = re.compile(
    r"^\[[\d\-: ,.]+\] \[(INFO|DEBUG)\] "  # DeepSpeed's records below WARNING (its launcher logs at INFO)
    r"|Unable to find hostfile, will proceed with training with local resources only"  # always local here
    r"|^DeepSpeed \S+ built successfully$"  # each rank's JIT-built communication op
    r"|^\{\"")  # the trainer's result object (the pipeline reads results.json)


def launcher_line_shown(line: str, verbose: bool = False) -> bool:
    """Whether a line of the fine-tuning launcher's output goes to the terminal as well as to the log: not
    DeepSpeed's INFO records, its hostfile notice and op builds, or the trainer's JSON line, unless
    ``verbose``. (The trainer itself keeps back its ranks' INFO records and the collectives' warnings
    without --verbose.)"""
    return verbose or not _LAUNCHER_CHATTER.search(line.rstrip("\r\n"))
