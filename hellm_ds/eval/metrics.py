"""Top-k metrics of a single held-out target, accumulated across batches and ranks, under a tie rule.

The ranking (``hellm_ds.eval.ranking``) gives, per user, ``h`` items scored strictly higher than the target
and ``t`` other items scored exactly like it. With one relevant item per user and the target at 0-based
rank ``r``:

- Recall@k    = [r < k]                      (= HitRate@k with one target)
- NDCG@k      = [r < k] / log2(r + 2)        (ideal DCG is 1)
- MRR@k       = [r < k] / (r + 1)
- Precision@k = [r < k] / k
- MAP@k       = [r < k] / (r + 1)            (AP@k normalised by min(#relevant, k) = 1; equals MRR@k here,
                                              reported because papers report both)

Tie rules (``TIE_RULES``):
- ``expected`` (default): the expectation of each metric under uniformly random tie-breaking (McSherry &
  Najork, ECIR 2008): each rank ``r = h … h + t`` has probability ``1 / (t + 1)``, so
  metric@k = ``(G(min(h + t + 1, k)) − G(min(h, k))) / (t + 1)`` with ``G(j) = Σ_{r<j} gain(r)``, exact
  (no sampling). A constant scorer gets Recall@k ≈ k / n_items, as it should.
- ``optimistic``: ``r = h`` — ties count in the target's favour, as the HeLLM authors' code ranks; a
  constant scorer then gets Recall@k = 1. For comparison with published numbers only.

Every result also has ``mean_ties``: the mean ``t`` per user, so a degenerate model is visible whatever the
rule, and ``users``: how many users the means are over. Means are over every user of the split (none is
skipped); sums are float64 and all-reduced when torch.distributed is initialised, so a sharded evaluation
equals a single-process one.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

DEFAULT_KS = (5, 10, 20)
METRICS = ("Recall", "NDCG", "MRR", "Precision", "MAP")
TIE_RULES = ("expected", "optimistic")
MEAN_TIES = "mean_ties"
USERS = "users"  # the number of users the means are over (every result has it)


def check_tie_rule(ties: str) -> str:
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule {ties!r}; choose from {TIE_RULES}")
    return ties


def _gain(name: str, r: torch.Tensor, k: int) -> torch.Tensor:
    """The metric's value at 0-based rank ``r < k`` (float64)."""
    if name == "Recall":
        return torch.ones_like(r)
    if name == "NDCG":
        return 1.0 / torch.log2(r + 2.0)
    if name in ("MRR", "MAP"):
        return 1.0 / (r + 1.0)
    return torch.full_like(r, 1.0 / k)  # Precision


def per_user_metrics(ranks: torch.Tensor, ks=DEFAULT_KS, ties: torch.Tensor | None = None,
                     rule: str = "expected") -> dict[str, torch.Tensor]:
    """Each metric@k for each user (float64 [B]) from ``h`` (``ranks``: items strictly higher) and ``t``
    (``ties``: other items tied with the target; none given = no ties) under ``rule``."""
    check_tie_rule(rule)
    h = ranks.to(torch.float64)
    t = torch.zeros_like(h) if ties is None or rule == "optimistic" else ties.to(torch.float64)
    untied = t == 0
    out = {}
    for name in METRICS:
        for k in ks:
            # the exact gain at rank h where nothing ties (bit-identical to the optimistic rule there)
            single = torch.where(h < k, _gain(name, h.clamp_max(k - 1), k), 0.0)
            if untied.all():
                out[f"{name}@{k}"] = single
                continue
            prefix = torch.zeros(k + 1, dtype=torch.float64)  # G(j) = Σ_{r<j} gain(r)
            prefix[1:] = torch.cumsum(_gain(name, torch.arange(k, dtype=torch.float64), k), 0)
            hi = torch.clamp(h + t + 1, max=k).long()
            lo = torch.clamp(h, max=k).long()
            spread = (prefix[hi] - prefix[lo]) / (t + 1.0)
            out[f"{name}@{k}"] = torch.where(untied, single, spread)
    return out


class MetricAccumulator:
    """Sums per-user metrics over batches; ``result()`` reduces across ranks and returns means (and
    ``mean_ties``)."""

    def __init__(self, ks=DEFAULT_KS, rule: str = "expected"):
        self.ks = tuple(ks)
        self.rule = check_tie_rule(rule)
        self.names = [f"{m}@{k}" for m in METRICS for k in self.ks]
        self.sums = torch.zeros(len(self.names) + 1, dtype=torch.float64)  # last: tie count
        self.count = 0

    def add(self, ranks: torch.Tensor, ties: torch.Tensor | None = None) -> None:
        if ranks.numel() == 0:
            return
        ties = None if ties is None else ties.detach().cpu()
        per_user = per_user_metrics(ranks.detach().cpu(), self.ks, ties, self.rule)
        tie_sum = torch.zeros((), dtype=torch.float64) if ties is None else ties.to(torch.float64).sum()
        self.sums += torch.stack([per_user[n].sum() for n in self.names] + [tie_sum])
        self.count += ranks.numel()

    def result(self, group=None) -> dict[str, float]:
        totals = torch.cat([self.sums, torch.tensor([float(self.count)], dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend(group)
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
            totals = totals.to(device)
            dist.all_reduce(totals, group=group)
            totals = totals.cpu()
        n = totals[-1].item()
        names = self.names + [MEAN_TIES]
        if n == 0:  # nothing evaluated: NaN means (printed as JSON null), and "users": 0 says why
            return {**{name: math.nan for name in names}, USERS: 0}
        return {**{name: totals[i].item() / n for i, name in enumerate(names)}, USERS: int(round(n))}
