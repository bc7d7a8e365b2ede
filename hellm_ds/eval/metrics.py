"""Top-k metrics from the rank of a single held-out target, accumulated across batches and ranks.

With ``r`` the 0-based rank of the target (the number of items scored strictly higher; see
``hellm_ds.eval.ranking``) and one relevant item per user:

- Recall@k    = [r < k]                      (= HitRate@k with one target)
- NDCG@k      = [r < k] / log2(r + 2)        (ideal DCG is 1)
- MRR@k       = [r < k] / (r + 1)
- Precision@k = [r < k] / k
- MAP@k       = [r < k] / (r + 1)            (AP@k normalised by min(#relevant, k) = 1; equals MRR@k here,
                                              reported because papers report both)

Means are over every user of the split (none is skipped); sums are float64 and all-reduced when
torch.distributed is initialised, so a sharded evaluation equals a single-process one.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

DEFAULT_KS = (5, 10, 20)
METRICS = ("Recall", "NDCG", "MRR", "Precision", "MAP")


def per_user_metrics(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[str, torch.Tensor]:
    """Each metric@k for each user (float64 [B]) from 0-based target ranks."""
    r = ranks.to(torch.float64)
    out = {}
    for name in METRICS:
        for k in ks:
            hit = (r < k).to(torch.float64)
            if name == "Recall":
                v = hit
            elif name == "NDCG":
                v = hit / torch.log2(r + 2.0)
            elif name in ("MRR", "MAP"):
                v = hit / (r + 1.0)
            else:  # Precision
                v = hit / k
            out[f"{name}@{k}"] = v
    return out


class MetricAccumulator:
    """Sums per-user metrics over batches; ``result()`` reduces across ranks and returns means."""

    def __init__(self, ks=DEFAULT_KS):
        self.ks = tuple(ks)
        self.names = [f"{m}@{k}" for m in METRICS for k in self.ks]
        self.sums = torch.zeros(len(self.names), dtype=torch.float64)
        self.count = 0

    def add(self, ranks: torch.Tensor) -> None:
        if ranks.numel() == 0:
            return
        per_user = per_user_metrics(ranks.detach().cpu(), self.ks)
        self.sums += torch.stack([per_user[n].sum() for n in self.names])
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
        if n == 0:
            return {name: math.nan for name in self.names}
        return {name: totals[i].item() / n for i, name in enumerate(self.names)}
