"""Full-ranking evaluation of any model over a validation/test split, batched and sharded across ranks.

A model is given as ``user_fn(batch) -> Tensor``, where ``batch`` is the left-padded collator output
(``input_ids``, ``attention_mask``, ``users``, ``targets``):
- with ``item_vectors`` ([n_items + 1, d], row 0 padding) the function returns user vectors ``[B, d]`` and
  scores are ``u · item_vectors.T (+ item_bias)``, computed in item chunks (never a users × items matrix);
- without, it returns dense scores ``[B, n_items + 1]`` for the batch.

Users are batched by history length (a sequence model's batch is padded to its longest history). Each
rank evaluates a disjoint shard of users; sums are all-reduced, so the result does not depend on the
world size. Metrics follow a tie rule (``ties``: ``expected``, the default, or ``optimistic``; see
``hellm_ds.eval.metrics``) and each protocol's result carries ``mean_ties``, the mean number of items tied
with the target. ``lockstep=True`` makes every rank run the same number of forward passes (ZeRO-3 gathers
parameters collectively in every forward); the filler samples are not counted.

``on_ranks(users, targets, ranks)``, when given, is called once per batch with the batch's real (non-filler)
rows: ``users`` and ``targets`` (numpy int64: internal user indices, target item ids) and ``ranks``, what
``rank_targets`` returns for those rows (``{protocol: h, "ties": {protocol: t}}``, CPU tensors). Under
``torch.distributed`` it sees only this rank's shard of users (``hellm-ds evaluate`` runs in one process).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Iterable

import numpy as np
import torch

from hellm_ds.data.batching import NextItemExamples, ShardedSampler, dist_rank_world
from hellm_ds.data.dataset import Dataset
from hellm_ds.eval.metrics import DEFAULT_KS, MEAN_TIES, MetricAccumulator, check_tie_rule
from hellm_ds.eval.ranking import PROTOCOLS, rank_targets, rank_targets_from_scores
from hellm_ds.utils.progress import progress_bar

UserFn = Callable[[dict], torch.Tensor]


@torch.no_grad()
def evaluate(
    dataset: Dataset,
    split: str,
    user_fn: UserFn,
    item_vectors: torch.Tensor | None = None,
    item_bias: torch.Tensor | None = None,
    protocols: Iterable[str] = PROTOCOLS,
    ks=DEFAULT_KS,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    lockstep: bool = False,
    progress: bool = True,
    ties: str = "expected",
    on_ranks: Callable[[np.ndarray, np.ndarray, dict], None] | None = None,
) -> dict[str, dict[str, float]]:
    """``{protocol: {"Recall@10": …, …, "mean_ties": …}}`` for one split under the tie rule ``ties``."""
    check_tie_rule(ties)
    protocols = tuple(protocols)
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; choose from {PROTOCOLS}")
    device = torch.device(device)
    examples = NextItemExamples(dataset, split)
    rank, world = dist_rank_world()
    shard = ShardedSampler(len(examples), world, rank, shuffle=False, drop_last=False).indices()
    # batches of similar history length pad little (the sums do not depend on the order); longest first,
    # so a batch that does not fit shows at once
    lengths = np.minimum(examples.ends - examples.starts, examples.max_len)
    shard = shard[np.argsort(-lengths[shard], kind="stable")]
    n_batches = math.ceil(shard.size / batch_size)
    if lockstep:  # every rank runs as many batches as the largest shard needs
        n_batches = math.ceil(math.ceil(len(examples) / world) / batch_size)
    acc = {p: MetricAccumulator(ks, ties) for p in protocols}
    if item_vectors is not None:
        item_vectors = item_vectors.to(device)
        item_bias = None if item_bias is None else item_bias.to(device)
    for b in progress_bar(range(n_batches), desc=f"eval {split}", enabled=progress and rank == 0):
        idx = shard[b * batch_size : (b + 1) * batch_size]
        n_real = idx.size
        if n_real == 0:  # lockstep filler: run the model, count nothing
            idx = np.zeros(1, dtype=np.int64)
        batch = {k: v.to(device) for k, v in examples.collate(idx).items()}
        out = user_fn(batch)
        history = batch["input_ids"] if "filtered" in protocols else None
        if item_vectors is not None:
            ranks = rank_targets(out, item_vectors, batch["targets"], history, item_bias)
        else:
            ranks = rank_targets_from_scores(out, batch["targets"], history)
        for p in protocols:
            acc[p].add(ranks[p][:n_real], ranks["ties"][p][:n_real])
        if on_ranks is not None and n_real > 0:
            on_ranks(examples.users[idx].astype(np.int64), examples.targets[idx].astype(np.int64),
                     {**{p: ranks[p][:n_real].cpu() for p in protocols},
                      "ties": {p: ranks["ties"][p][:n_real].cpu() for p in protocols}})
    res = {p: acc[p].result() for p in protocols}  # all-reduced: every rank sees the same tie count
    tied = res[protocols[0]][MEAN_TIES] / max(dataset.n_items - 1, 1) if protocols else 0.0
    if tied > 0.5:
        what = ("expected over random tie orders, so close to chance" if ties == "expected"
                else "counted in the target's favour (--ties optimistic), so these metrics are meaningless")
        warnings.warn(f"{split}: on average the target ties with {100 * tied:.0f}% of the catalogue (collapsed "
                      f"scores?); ties are {what}", stacklevel=2)
    return res


def evaluate_splits(dataset: Dataset, user_fn: UserFn, splits=("valid", "test"), ties: str = "expected",
                    on_split_ranks: Callable[[str, np.ndarray, np.ndarray, dict], None] | None = None,
                    **kwargs) -> dict:
    """``{"valid": {protocol: metrics}, "test": {…}, "ties": rule}`` — the JSON shape every ``hellm-ds``
    command prints (``ties`` names the rule that produced the metrics). ``on_split_ranks(split, users,
    targets, ranks)``: ``evaluate``'s ``on_ranks`` with the split's name first."""
    out = {s: evaluate(dataset, s, user_fn, ties=ties,
                       on_ranks=None if on_split_ranks is None else functools.partial(on_split_ranks, s),
                       **kwargs)
           for s in splits}
    return {**out, "ties": ties}
