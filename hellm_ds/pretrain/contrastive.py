"""InfoNCE between two views of the same nodes (METHOD §3), over all nodes in blocks or over a batch.

For node n, with s the cosine similarity and τ the temperature:

    ℓ_n = −log  e^{s(z1_n, z2_n)/τ} / ( Σ_{m≠n} e^{s(z1_n, z1_m)/τ} + Σ_m e^{s(z1_n, z2_m)/τ} )

``info_nce_full`` averages ℓ over all N nodes. It visits B query rows at a time and recomputes each block in
the backward pass (activation checkpointing), so memory stays O(B·N) instead of O(N²) — the time is still
O(N²·d) per call. ``info_nce_batch`` is the cheap variant: the same loss restricted to a set of node ids
(the current batch), O(b²·d).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _block_loss(q1: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, lo: int, tau: float) -> torch.Tensor:
    """Σ ℓ_n for query rows q1 = z1[lo:lo+B] (all inputs already L2-normalised)."""
    B = q1.shape[0]
    rows = torch.arange(B, device=q1.device)
    s11 = (q1 @ z1.T) / tau
    s11 = s11.index_put((rows, rows + lo), s11.new_tensor(float("-inf")))  # drop m = n (out of place)
    s12 = (q1 @ z2.T) / tau
    pos = s12[rows, rows + lo]
    return (torch.logsumexp(torch.cat([s11, s12], dim=1), dim=1) - pos).sum()


def info_nce_full(z1: torch.Tensor, z2: torch.Tensor, tau: float, block: int = 2048) -> torch.Tensor:
    """Mean InfoNCE over all N nodes; memory O(block·N) in forward and backward."""
    if z1.shape != z2.shape:
        raise ValueError(f"views differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}")
    z1n, z2n = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    n = z1.shape[0]
    total = z1.new_zeros(())
    for lo in range(0, n, block):
        q = z1n[lo : lo + block]
        if torch.is_grad_enabled() and (z1.requires_grad or z2.requires_grad):
            total = total + checkpoint(_block_loss, q, z1n, z2n, lo, tau, use_reentrant=False)
        else:
            total = total + _block_loss(q, z1n, z2n, lo, tau)
    return total / n


def info_nce_batch(z1: torch.Tensor, z2: torch.Tensor, tau: float, nodes: torch.Tensor) -> torch.Tensor:
    """Mean InfoNCE over the given (deduplicated) node ids only, contrasting them among themselves."""
    nodes = torch.unique(nodes)
    return info_nce_full(z1[nodes], z2[nodes], tau, block=max(int(nodes.numel()), 1))
