"""Full ranking of every catalogue item, in chunks, without ever holding a users × items matrix.

For each user the ranking yields two counts over the *other* catalogue items: ``h``, the items scored
strictly higher than the target, and ``t``, the items scored exactly like it. The target's rank is then
anywhere in ``h … h + t``; ``hellm_ds.eval.metrics`` turns the pair into metrics under a tie rule
(``expected``: the mean over uniformly random tie-breaking, the default; ``optimistic``: rank ``h``, ties in
the target's favour, as the authors' code ranks).

Scores are compared in fp32 (or wider, if the inputs are): a bf16 model's user and item vectors are widened
before the product, so ties are not manufactured by 8-bit mantissas. Ties are decided on the computed
scores. The target's own score comes from a matrix product like the catalogue's (an element-wise product
summed in another order differs in the last bit about half the time); BLAS may still round one dot product
differently at another column position, so only scores exact in fp32 are sure to tie with equal ones. An
item whose score is NaN counts as higher (a broken model is never flattered), and a NaN target score is a
miss (``h = n_items``, ``t = 0``).

Protocols (METHOD §6):
- ``paper``: nothing is masked (the HeLLM authors' numbers).
- ``filtered``: the user's input history (the truncated sequence the model reads) is masked out, from both
  counts. A target that also occurs in that history is then masked too and counts as a miss (``h =
  n_items``); the Amazon sets in S3-Rec layout have no such repeats.

Item ids are 1..n_items; column/row 0 of score and item tables is padding and never ranked.
"""
from __future__ import annotations

import torch

PROTOCOLS = ("paper", "filtered")
_TARGET_BLOCK = 256  # users per [block × block] product when scoring the targets


def ranking_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores are computed and compared in: fp32, or the input's if wider."""
    return torch.promote_types(dtype, torch.float32)


def _count(
    scores: torch.Tensor,  # [B, C] scores of items lo..lo+C-1
    lo: int,
    target_scores: torch.Tensor,  # [B]
    targets: torch.Tensor,  # [B] item ids
    history: torch.Tensor | None,  # [B, L] item ids, 0 = padding
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{protocol: (higher, tied)}`` counts of this chunk's items, the target itself excluded."""
    higher = ~(scores <= target_scores[:, None])  # NaN scores count as higher
    tied = scores == target_scores[:, None]
    rows = torch.arange(scores.shape[0], device=scores.device)
    in_chunk = (targets >= lo) & (targets < lo + scores.shape[1])
    higher[rows[in_chunk], targets[in_chunk] - lo] = False  # the target is neither above nor beside itself
    tied[rows[in_chunk], targets[in_chunk] - lo] = False
    h, t = _row_count(higher), _row_count(tied)
    out = {"paper": (h, t)}
    if history is not None:
        # filtered = paper minus the history's distinct items in this chunk (read from the same masks, so a
        # history item counts exactly as the catalogue pass counted it; the target is False in both already):
        # a gather of B × L entries instead of a second pass over the B × C masks
        C = scores.shape[1]
        hist_in = (history >= lo) & (history < lo + C) & (history > 0)
        r, c = hist_in.nonzero(as_tuple=True)
        key = torch.unique(r * C + (history[r, c] - lo))  # a user's repeated item counts once
        r, i = key // C, key % C
        B = scores.shape[0]
        out["filtered"] = (h - torch.bincount(r[higher[r, i]], minlength=B),
                           t - torch.bincount(r[tied[r, i]], minlength=B))
    return out


def _row_count(mask: torch.Tensor) -> torch.Tensor:
    # bool.sum() widens element-wise to int64 and is >10x slower on CPU than summing the bytes
    return mask.view(torch.uint8).sum(1, dtype=torch.int32).long()


def score_chunks(user_vectors: torch.Tensor, item_vectors: torch.Tensor, item_bias: torch.Tensor | None,
                 chunk: int):
    """Yield ``(lo, scores [B, hi - lo])`` of items ``lo..hi-1`` (from 1: row 0 is padding), scores =
    ``u · Wᵀ (+ b)`` in ``ranking_dtype`` (fp32 at least) — the one item loop of full ranking and top-k."""
    dtype = ranking_dtype(user_vectors.dtype)
    users = user_vectors.to(dtype)
    n_rows = item_vectors.shape[0]
    for lo in range(1, n_rows, chunk):
        hi = min(lo + chunk, n_rows)
        s = users @ item_vectors[lo:hi].to(dtype).T
        yield lo, (s if item_bias is None else s + item_bias[lo:hi].to(dtype))


def target_scores(user_vectors: torch.Tensor, item_vectors: torch.Tensor, targets: torch.Tensor,
                  item_bias: torch.Tensor | None) -> torch.Tensor:
    """``u_b · W[target_b] (+ b)`` as the diagonal of a matrix product, like ``score_chunks``'s (see the module
    docstring); user blocks keep the side product at block² elements."""
    dtype = ranking_dtype(user_vectors.dtype)
    out = torch.empty(user_vectors.shape[0], dtype=dtype, device=user_vectors.device)
    for i in range(0, user_vectors.shape[0], _TARGET_BLOCK):
        t = targets[i: i + _TARGET_BLOCK]
        s = (user_vectors[i: i + _TARGET_BLOCK].to(dtype) @ item_vectors[t].to(dtype).T).diagonal()
        out[i: i + _TARGET_BLOCK] = s if item_bias is None else s + item_bias[t].to(dtype)
    return out


def rank_targets(
    user_vectors: torch.Tensor,  # [B, d]
    item_vectors: torch.Tensor,  # [n_items + 1, d]; row 0 is padding
    targets: torch.Tensor,  # [B] item ids in 1..n_items
    history: torch.Tensor | None = None,  # [B, L] item ids (0 = pad); needed for "filtered"
    item_bias: torch.Tensor | None = None,  # [n_items + 1]
    chunk_elems: int = 1 << 24,
) -> dict:
    """Counts for scores ``user_vectors @ item_vectors.T (+ item_bias)``, item chunk by chunk (memory
    O(B·chunk)): ``{"paper": h, "ties": {"paper": t}}`` and, with ``history``, ``"filtered"`` entries too
    (``h`` is the optimistic 0-based rank)."""
    n_items = item_vectors.shape[0] - 1
    B = user_vectors.shape[0]
    targets = targets.to(user_vectors.device)
    t_score = target_scores(user_vectors, item_vectors, targets, item_bias)
    chunk = max(1, chunk_elems // max(B, 1))
    zeros = torch.zeros(B, dtype=torch.long, device=user_vectors.device)
    totals = {p: [zeros.clone(), zeros.clone()] for p in (PROTOCOLS if history is not None else ("paper",))}
    for lo, s in score_chunks(user_vectors, item_vectors, item_bias, chunk):
        for p, (h, t) in _count(s, lo, t_score, targets, history).items():
            totals[p][0] += h
            totals[p][1] += t
    return _finish(totals, t_score, targets, history, n_items)


def rank_targets_from_scores(
    scores: torch.Tensor,  # [B, n_items + 1]; column 0 is padding
    targets: torch.Tensor,
    history: torch.Tensor | None = None,
) -> dict:
    """The same counts for a model that produces a dense score row per user (one user batch at a time)."""
    n_items = scores.shape[1] - 1
    scores = scores.to(ranking_dtype(scores.dtype))
    targets = targets.to(scores.device)
    t_score = scores.gather(1, targets[:, None])[:, 0]
    totals = {p: list(c) for p, c in _count(scores[:, 1:], 1, t_score, targets, history).items()}
    return _finish(totals, t_score, targets, history, n_items)


def _finish(totals, t_score, targets, history, n_items) -> dict:
    """A NaN target score, or (``filtered``) a target masked as history, is a miss without ties."""
    miss = {"paper": torch.isnan(t_score)}
    if history is not None:
        miss["filtered"] = miss["paper"] | (history == targets[:, None]).any(1)
    out: dict = {"ties": {}}
    for p, (h, t) in totals.items():
        out[p] = torch.where(miss[p], n_items, h)
        out["ties"][p] = torch.where(miss[p], 0, t)
    return out
