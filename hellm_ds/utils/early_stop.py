"""Early stopping on a validation metric (higher is better)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EarlyStopper:
    patience: int
    best: float = float("-inf")
    best_epoch: int = -1
    bad_evals: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record one evaluation; True when it is a new best."""
        if value > self.best:
            self.best, self.best_epoch, self.bad_evals = value, epoch, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_evals": self.bad_evals}

    def load_state_dict(self, s: dict) -> None:
        self.best, self.best_epoch, self.bad_evals = float(s["best"]), int(s["best_epoch"]), int(s["bad_evals"])
