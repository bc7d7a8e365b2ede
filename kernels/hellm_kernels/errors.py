"""The kernel package's one exception type for a call it refuses (bad arguments, wrong process state).

A leaf of its own: ``hellm_ds`` maps it to its ``UsageError`` where the CLI prints errors (same message).
"""


class KernelUsageError(ValueError):
    """A kernel-package function was called with arguments or in a state it cannot serve."""
