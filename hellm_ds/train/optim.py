"""The fine-tuning optimiser: AdamW, run by DeepSpeed's ``DeepSpeedCPUAdam`` under ZeRO-Offload.

With ``zero_optimization.offload_optimizer`` (``ds_configs/zero3_offload.json``) the fp32 master weights and
the Adam moments live in CPU memory and the update runs on the CPU. DeepSpeed then wants its own C++/AVX
Adam (``DeepSpeedCPUAdam``, the ``cpu_adam`` op, JIT-compiled by its op builder on first use into
``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``: minutes once, then cached; the ranks of one
machine wait on the first one's build through a lock file there) and refuses a client ``torch.optim.AdamW``
unless ``zero_force_ds_cpu_optimizer`` is false. ``--offload-optimizer`` picks:

- ``auto`` (default): ``DeepSpeedCPUAdam`` when the config offloads the optimiser, ``torch.optim.AdamW``
  otherwise;
- ``cpu_adam``: the same, but an error when the config does not offload the optimiser;
- ``torch``: ``torch.optim.AdamW`` even under offload (sets ``zero_force_ds_cpu_optimizer: false``, warns
  that the update is slow) — the fall-back where the op cannot build.

Both get the same hyper-parameters (lr, β1/β2, eps 1e-8, decoupled weight decay) and the same parameter
groups; the LR scheduler sets each group's ``lr``, which both read at every step. The decision depends on the
config and the choice alone, never on the device (DeepSpeed's CPU accelerator builds the same op).
"""
from __future__ import annotations

import sys

import torch

from hellm_ds.errors import UsageError

OFFLOAD_OPTIMIZER_CHOICES = ("auto", "cpu_adam", "torch")
EPS = 1e-8
FALLBACK = ("pass --offload-optimizer torch to run torch's AdamW on the CPU instead (same results, several "
            "times slower per step)")
SLOW_WARNING = ("hellm-ds: warning: --offload-optimizer torch: torch's AdamW runs the offloaded update on "
                "the CPU (zero_force_ds_cpu_optimizer: false), several times slower per step than "
                "DeepSpeedCPUAdam; use it only where DeepSpeed's cpu_adam op cannot build")


class OptimizerBuildError(UsageError):
    """DeepSpeedCPUAdam's ``cpu_adam`` op could not be built or loaded; the message says why and names the
    fall-back flag (the CLI prints it and exits 2)."""


def offloads_optimizer(ds: dict) -> bool:
    """Whether the DeepSpeed config puts the optimiser (state and step) in CPU memory (or on NVMe)."""
    off = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return str(off.get("device", "none")).lower() in ("cpu", "nvme")


def offload_optimizer_plan(ds: dict, choice: str = "auto", warn: bool = True) -> tuple[dict, str]:
    """``(ds, kind)``: the DeepSpeed config to use and the optimiser, ``"cpu_adam"`` (DeepSpeedCPUAdam) or
    ``"torch"`` (torch.optim.AdamW). ``torch`` under offload returns a copy with
    ``zero_force_ds_cpu_optimizer: false`` and prints one warning on stderr (``warn``: rank 0)."""
    if choice not in OFFLOAD_OPTIMIZER_CHOICES:
        raise UsageError(f"offload_optimizer must be one of {OFFLOAD_OPTIMIZER_CHOICES}, got {choice!r}")
    if not offloads_optimizer(ds):
        if choice == "cpu_adam":
            raise UsageError("--offload-optimizer cpu_adam needs a DeepSpeed config that offloads the "
                             "optimiser (zero_optimization.offload_optimizer.device cpu, e.g. "
                             "ds_configs/zero3_offload.json)")
        return ds, "torch"
    if choice == "torch":
        if warn:
            print(SLOW_WARNING, file=sys.stderr, flush=True)
        return {**ds, "zero_force_ds_cpu_optimizer": False}, "torch"
    return ds, "cpu_adam"


def _reason(err: BaseException, max_lines: int = 8) -> str:
    """The first lines of a build error and its causes, the compiler's ``error`` lines first among them."""
    texts, e = [], err
    while e is not None and len(texts) < 4:
        texts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    lines = [ln.strip() for text in texts for ln in text.splitlines() if ln.strip()]
    picked = list(dict.fromkeys(lines[:1] + [ln for ln in lines if "error" in ln.lower()]))[:max_lines]
    return "\n  ".join(ln if len(ln) <= 300 else ln[:297] + "..." for ln in picked)


def load_cpu_adam_op():
    """Build (on first use: JIT, minutes) or load DeepSpeed's ``cpu_adam`` op; ``OptimizerBuildError`` naming
    the reason and the fall-back when it cannot."""
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        return CPUAdamBuilder().load()
    except Exception as e:  # the builder raises RuntimeError, ImportError, OSError, CalledProcessError, ...
        raise OptimizerBuildError(
            "ZeRO-Offload's optimiser DeepSpeedCPUAdam needs DeepSpeed's C++ op `cpu_adam`, which could not "
            f"be built or loaded:\n  {_reason(e)}\nDeepSpeed JIT-compiles it once with g++ and ninja into "
            "$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions; delete its cpu_adam folder after a "
            f"killed build). To train without it, {FALLBACK}.") from e


def build_optimizer(groups: list[dict], kind: str, lr: float, betas: tuple[float, float],
                    weight_decay: float) -> torch.optim.Optimizer:
    """The optimiser ``kind`` (``offload_optimizer_plan``'s) over ``groups``; each group's own
    ``weight_decay`` wins over the default."""
    if kind == "torch":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=EPS, weight_decay=weight_decay)
    if kind != "cpu_adam":
        raise ValueError(f"unknown optimiser kind {kind!r}")
    load_cpu_adam_op()  # the clear error here, before DeepSpeedCPUAdam's own vaguer one
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    try:
        return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=EPS, weight_decay=weight_decay,
                                adamw_mode=True)
    except RuntimeError as e:
        if "cpu_adam" not in str(e):
            raise
        raise OptimizerBuildError(f"DeepSpeedCPUAdam could not be created:\n  {_reason(e)}\n"
                                  f"To train without it, {FALLBACK}.") from e
