"""Full ranking of every catalogue item, in chunks, without ever holding a users × items matrix.

The rank of a target is the number of *other* items with a strictly higher score: ties count in the
target's favour (an item scored exactly like the target does not push it down). Ties are decided on the
computed scores: two items equal in exact arithmetic may differ in the last bit after a matmul, since BLAS
accumulates in an order that depends on the column's position. An item whose score is NaN counts as higher
(a broken model is never flattered), and a NaN target score is a miss.

Protocols (METHOD §6):
- ``paper``: nothing is masked (the HeLLM authors' numbers).
- ``filtered``: the user's input history (the truncated sequence the model reads) is masked out. A target
  that also occurs in that history is then masked too and counts as a miss (rank = n_items); the Amazon sets
  in S3-Rec layout have no such repeats.

Item ids are 1..n_items; column/row 0 of score and item tables is padding and never ranked.
"""
from __future__ import annotations

import torch

PROTOCOLS = ("paper", "filtered")


def _count_higher(
    scores: torch.Tensor,  # [B, C] scores of items lo..lo+C-1
    lo: int,
    target_scores: torch.Tensor,  # [B]
    targets: torch.Tensor,  # [B] item ids
    history: torch.Tensor | None,  # [B, L] item ids, 0 = padding
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(count for ``paper``, count for ``filtered`` or None, items tied with the target) in this chunk."""
    higher = ~(scores <= target_scores[:, None])  # NaN scores count as higher
    rows = torch.arange(scores.shape[0], device=scores.device)
    in_chunk = (targets >= lo) & (targets < lo + scores.shape[1])
    tied = _row_count(scores == target_scores[:, None]) - in_chunk.long()
    higher[rows[in_chunk], targets[in_chunk] - lo] = False  # the target never outranks itself
    paper = _row_count(higher)
    if history is None:
        return paper, None, tied
    hist_in = (history >= lo) & (history < lo + scores.shape[1]) & (history > 0)
    r, c = hist_in.nonzero(as_tuple=True)
    higher[r, history[r, c] - lo] = False
    return paper, _row_count(higher), tied


def _row_count(mask: torch.Tensor) -> torch.Tensor:
    # bool.sum() widens element-wise to int64 and is >10x slower on CPU than summing the bytes
    return mask.view(torch.uint8).sum(1, dtype=torch.int32).long()


def score_chunks(user_vectors: torch.Tensor, item_vectors: torch.Tensor, item_bias: torch.Tensor | None,
                 chunk: int):
    """Yield ``(lo, scores [B, hi - lo])`` of items ``lo..hi-1`` (from 1: row 0 is padding), scores =
    ``u · Wᵀ (+ b)`` in the users' dtype — the one item loop of full ranking and top-k."""
    n_rows = item_vectors.shape[0]
    for lo in range(1, n_rows, chunk):
        hi = min(lo + chunk, n_rows)
        s = user_vectors @ item_vectors[lo:hi].to(user_vectors.dtype).T
        yield lo, (s if item_bias is None else s + item_bias[lo:hi])


def rank_targets(
    user_vectors: torch.Tensor,  # [B, d]
    item_vectors: torch.Tensor,  # [n_items + 1, d]; row 0 is padding
    targets: torch.Tensor,  # [B] item ids in 1..n_items
    history: torch.Tensor | None = None,  # [B, L] item ids (0 = pad); needed for "filtered"
    item_bias: torch.Tensor | None = None,  # [n_items + 1]
    chunk_elems: int = 1 << 24,
) -> dict[str, torch.Tensor]:
    """0-based target ranks for scores ``user_vectors @ item_vectors.T (+ item_bias)``, item chunk by chunk
    (memory O(B·chunk)). Returns ``{"paper": ranks}`` and, with ``history``, ``"filtered"`` too."""
    n_items = item_vectors.shape[0] - 1
    B = user_vectors.shape[0]
    targets = targets.to(user_vectors.device)
    t_vec = item_vectors[targets].to(user_vectors.dtype)
    t_score = (user_vectors * t_vec).sum(-1)
    if item_bias is not None:
        t_score = t_score + item_bias[targets]
    chunk = max(1, chunk_elems // max(B, 1))
    paper = torch.zeros(B, dtype=torch.long, device=user_vectors.device)
    tied = torch.zeros_like(paper)
    filtered = torch.zeros_like(paper) if history is not None else None
    for lo, s in score_chunks(user_vectors, item_vectors, item_bias, chunk):
        p, f, t = _count_higher(s, lo, t_score, targets, history)
        paper += p
        tied += t
        if filtered is not None:
            filtered += f
    return _finish(paper, filtered, tied, t_score, targets, history, n_items)


def rank_targets_from_scores(
    scores: torch.Tensor,  # [B, n_items + 1]; column 0 is padding
    targets: torch.Tensor,
    history: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The same ranks for a model that produces a dense score row per user (one user batch at a time)."""
    n_items = scores.shape[1] - 1
    targets = targets.to(scores.device)
    t_score = scores.gather(1, targets[:, None])[:, 0]
    paper, filtered, tied = _count_higher(scores[:, 1:], 1, t_score, targets, history)
    return _finish(paper, filtered, tied, t_score, targets, history, n_items)


def _finish(paper, filtered, tied, t_score, targets, history, n_items) -> dict[str, torch.Tensor]:
    """Ranks per protocol, plus ``"ties"``: how many other items score exactly like the target (a model
    whose scores collapse to a constant would otherwise look perfect; the evaluator warns about it)."""
    nan = torch.isnan(t_score)
    paper = torch.where(nan, n_items, paper)
    out = {"paper": paper, "ties": tied}
    if filtered is not None:
        masked_target = (history == targets[:, None]).any(1)
        out["filtered"] = torch.where(nan | masked_target, n_items, filtered)
    return out
