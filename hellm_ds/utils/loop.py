"""The epoch loop every training recipe shares, its checkpoint contract, and the one log schema.

A recipe (graph pre-training, SASRec, stage-2 fine-tuning) plugs in what is its own — see ``Recipe``: one
epoch of training, validation, what to keep at a new best, the final test, the export, and its state. The
loop owns the rest, identically for all of them:

- epochs numbered from 1 (``epoch`` = passes done; ``best_epoch`` = the epoch whose validation was best);
- a time budget counted across resumes: training stops after the epoch that crosses it;
- validation every ``eval_every`` epochs, after the last epoch, and after a stop by time budget or step cap
  (a run stopped before its first epoch end still validates, tests and exports what it has);
- early stopping after ``patience`` validations without a new best of the selection metric (a non-finite
  value never counts as a best);
- a checkpoint after every epoch; ``resume`` continues from it — a resumed run that already stopped (early
  stopping, budget) trains no further epoch, it re-tests and re-exports;
- a fresh run refuses a directory that holds a checkpoint; a resumed run refuses a checkpoint of another
  recipe, dataset or configuration, naming each difference (``resume_check``);
- randomness: a recipe draws only from generators seeded by ``seed`` (and epoch / step where it reseeds)
  whose state its checkpoint restores, under ``torch.random.fork_rng`` — the caller's global RNG is untouched.

Log schema (``log.jsonl``; every record has ``event`` and ``time``, seconds since the log opened; ``step``
is the number of optimiser steps taken):

==============  ==================================================================================
``start``       ``recipe``, ``config``, ``dataset`` (+ recipe facts): a fresh run
``resume``      ``step``, ``epoch`` (epochs done before this invocation)
``train``       ``step``, ``epoch``, ``loss``, ``lr``: every optimiser step (fine-tuning only)
``epoch``       ``step``, ``epoch``, ``loss``, ``seconds``, loss terms, ``valid`` when validated,
                ``partial: true`` when the epoch was cut short (``max_steps``)
``test``        ``step``, ``epoch``, ``metrics``: a recipe that tests during training (fine-tuning)
``checkpoint``  ``step``, ``tag``
``result``      ``step``, ``valid``, ``test``, ``ties``, ``best_epoch``, ``epochs_run``, ``global_step``,
                ``stop_reason``, ``seconds``, ``seconds_per_epoch`` (+ recipe facts): the run's end
==============  ==================================================================================

``valid`` / ``test`` / ``metrics`` are ``{"paper": {...}, "filtered": {...}}`` (``hellm_ds.eval``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from hellm_ds.errors import UsageError
from hellm_ds.utils.checkpoint import load_state, save_state
from hellm_ds.utils.early_stop import EarlyStopper
from hellm_ds.utils.progress import progress_line
from hellm_ds.utils.runlog import RunLog

STOP_REASONS = ("epochs", "early_stop", "time_budget", "max_steps")


@dataclass(frozen=True)
class LoopConfig:
    epochs: int
    eval_every: int = 1
    patience: int = 5
    time_budget: float | None = None  # seconds, across resumes
    select_protocol: str = "paper"
    select_metric: str = "NDCG@10"
    evaluate: bool = True  # False: no validation; every epoch end is kept as the best (fine-tuning --skip-eval)

    def selection(self, valid: dict) -> float:
        v = float(valid[self.select_protocol][self.select_metric])
        return v if math.isfinite(v) else float("-inf")


@dataclass
class LoopState:
    """What the loop itself checkpoints (a recipe adds its own state beside it)."""

    epoch: int = 0  # epochs done
    step: int = 0  # optimiser steps done
    elapsed: float = 0.0  # seconds of earlier invocations (the time budget's clock)
    stopper: EarlyStopper = field(default_factory=lambda: EarlyStopper(1))
    best_epoch: int | None = None  # the kept state's epoch
    best_valid: dict | None = None  # and its validation

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "elapsed": self.elapsed,
                "stopper": self.stopper.state_dict(), "best_epoch": self.best_epoch,
                "best_valid": self.best_valid}

    @classmethod
    def from_dict(cls, d: dict, patience: int) -> "LoopState":
        stopper = EarlyStopper(patience)
        stopper.load_state_dict(d["stopper"])
        return cls(epoch=int(d["epoch"]), step=int(d["step"]), elapsed=float(d["elapsed"]), stopper=stopper,
                   best_epoch=d["best_epoch"], best_valid=d["best_valid"])


class Recipe(Protocol):
    name: str  # "graph" | "sasrec" | "finetune": the log's and the checkpoint's recipe

    def train_epoch(self, epoch: int, state: LoopState) -> dict:
        """One pass; returns ``loss`` (mean) and optional loss terms; advances ``state.step``. A step cap
        returns ``stopped="max_steps"``, and ``partial=True`` when it cut the pass before its end."""

    def validate(self) -> dict: ...

    def keep_best(self, epoch: int, valid: dict | None, state: LoopState) -> None:
        """A new best validation (None: the run does not evaluate): keep what ``final_test`` needs (weights,
        or a test result and an export)."""

    def save(self, state: LoopState) -> None:
        """Checkpoint the loop state with the recipe's own (after every epoch)."""

    def final_test(self, state: LoopState) -> dict:
        """Test metrics of the best-on-validation state."""

    def export(self, result: dict) -> dict:
        """Write the run's export; returns fields to add to the result (paths, …)."""


def resume_check(path: Path, saved: dict, recipe: str, fingerprint: str, config: dict, free: set[str]) -> None:
    """Refuse to resume from another recipe's, dataset's or configuration's checkpoint; the message names
    every difference as ``{field: (checkpoint, now)}``. Fields in ``free`` (epochs, budgets, devices, …) may
    change between invocations: they do not change the trajectory."""
    if saved.get("recipe") != recipe:
        raise UsageError(f"{path} is a {saved.get('recipe')} checkpoint: give each recipe its own --out")
    if saved.get("dataset") != fingerprint:
        raise UsageError(f"{path} was trained on another dataset (fingerprint {saved.get('dataset')}, now "
                         f"{fingerprint}); refusing to resume from it")
    old = saved.get("config", {})
    keys = (set(old) | set(config)) - free
    diff = {k: (old.get(k), config.get(k)) for k in sorted(keys) if old.get(k) != config.get(k)}
    if diff:
        raise UsageError(f"{path} was trained with other hyper-parameters (checkpoint, now): {diff}; resume "
                         "with the same settings, or start a new run in a new --out")


def refuse_used_directory(ckpt: Path, resume: bool) -> None:
    if not resume and ckpt.exists():
        raise UsageError(f"{ckpt} exists: pass resume=True (--resume) to continue that run, or use a new --out")
    if resume and not ckpt.exists():
        raise UsageError(f"--resume: no checkpoint at {ckpt}")


class FileCheckpoint:
    """A stage-1 checkpoint: one ``torch.save`` file (atomic) holding the loop state, the recipe's state,
    the recipe name, the dataset fingerprint and the configuration."""

    def __init__(self, path: Path, recipe: str, fingerprint: str, config: dict, free: set[str]):
        self.path, self.recipe, self.fingerprint, self.config, self.free = path, recipe, fingerprint, config, free

    def save(self, loop: LoopState, recipe_state: dict) -> None:
        save_state(self.path, {"recipe": self.recipe, "dataset": self.fingerprint, "config": self.config,
                               "loop": loop.state_dict(), "state": recipe_state})

    def load(self, patience: int) -> tuple[LoopState, dict]:
        saved = load_state(self.path)
        resume_check(self.path, saved, self.recipe, self.fingerprint, self.config, self.free)
        if "loop" not in saved:
            raise UsageError(f"{self.path} was written by an older hellm_ds (no 'loop' state): start a new run "
                             "in a new --out")
        return LoopState.from_dict(saved["loop"], patience), saved["state"]


def start_log(log: RunLog, recipe: str, resume: bool, state: LoopState, **facts) -> None:
    """The run's first record of this invocation: ``start`` (fresh) or ``resume``."""
    if resume:
        log.log("resume", step=state.step, epoch=state.epoch)
    else:
        log.log("start", step=0, recipe=recipe, **facts)


def run_loop(recipe: Recipe, lc: LoopConfig, state: LoopState, log: RunLog, progress: bool = True,
             extra_result: dict | None = None) -> dict:
    """Train from ``state`` to a stop, then test the best state, export, log ``result`` and return it."""
    t0, before = time.perf_counter(), state.elapsed

    def elapsed() -> float:
        return before + time.perf_counter() - t0

    def over_budget() -> bool:
        return lc.time_budget is not None and elapsed() >= lc.time_budget

    seconds: list[float] = []
    stop = "early_stop" if state.stopper.should_stop else "time_budget" if over_budget() else None
    while stop is None and state.epoch < lc.epochs:
        epoch = state.epoch + 1
        te = time.perf_counter()
        stats = recipe.train_epoch(epoch, state)
        cut, partial = stats.pop("stopped", None), stats.pop("partial", False)
        seconds.append(time.perf_counter() - te)
        budget_hit = over_budget()
        rec = {**stats, "seconds": round(seconds[-1], 3)}
        if not partial:
            state.epoch = epoch
        if cut or epoch % lc.eval_every == 0 or epoch == lc.epochs or budget_hit:
            valid = _consider(recipe, lc, state, epoch, partial)
            if valid is not None:
                rec["valid"] = valid
        if partial:
            rec["partial"] = True
        log.log("epoch", step=state.step, epoch=epoch, **rec)
        if progress:  # one line per epoch (the bar is drawn on a terminal only)
            v = rec["valid"][lc.select_protocol][lc.select_metric] if "valid" in rec else None
            sel = "" if v is None else f", valid {lc.select_protocol} {lc.select_metric} {v:.4f}"
            progress_line(f"{recipe.name} epoch {epoch}: loss {rec['loss']:.4f} ({rec['seconds']:.1f} s){sel}")
        state.elapsed = elapsed()
        recipe.save(state)
        stop = cut or ("early_stop" if state.stopper.should_stop else "time_budget" if budget_hit else None)
    if state.best_epoch is None:  # nothing kept yet (e.g. epochs=0): the current state is the only candidate
        _consider(recipe, lc, state, state.epoch, partial=True)
    test = recipe.final_test(state)
    result = {"valid": state.best_valid, "test": test, "best_epoch": state.best_epoch,
              "epochs_run": state.epoch, "global_step": state.step, "stop_reason": stop or "epochs",
              "seconds": round(elapsed(), 3),
              "seconds_per_epoch": round(sum(seconds) / len(seconds), 3) if seconds else None,
              **(extra_result or {})}
    result.update(recipe.export(result))
    log.log("result", step=state.step, **result)
    return result


def _consider(recipe: Recipe, lc: LoopConfig, state: LoopState, epoch: int, partial: bool) -> dict | None:
    """Validate ``epoch`` and keep its state when it is the best so far. A cut epoch (``partial``) is kept only
    while nothing else is, and early stopping never sees it: a resumed run validates the whole epoch and
    selects exactly as an uninterrupted one. Returns the metrics (None when the run does not evaluate)."""
    if not lc.evaluate:
        state.best_epoch = epoch
        recipe.keep_best(epoch, None, state)
        return None
    valid = recipe.validate()
    new = state.best_epoch is None if partial else state.stopper.update(lc.selection(valid), epoch)
    if new:
        state.best_epoch, state.best_valid = epoch, valid
        recipe.keep_best(epoch, valid, state)
    return valid
