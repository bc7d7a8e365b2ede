"""SASRec (Kang & McAuley, 2018): causal self-attention over item-id sequences (METHOD §4).

For a left-padded batch of item ids x ∈ {0..I}^{B×L} (0 = padding) with real-token mask m::

    p_t   = (number of real tokens up to and including t) − 1        # 0 = the oldest kept item
    h⁰_t  = m_t · (√d · E[x_t] + P[p_t])                            # dropout after the sum
    hˡ⁺¹  = hˡ + Drop(Attn(LN(hˡ)))      Attn: causal + padding mask, n_heads heads
    hˡ⁺¹ ← hˡ⁺¹ + Drop(FFN(LN(hˡ⁺¹)))    FFN: d → d_ff → d (GELU), applied per position
    h     = LN_final(h^{n_blocks})                                   # [B, L, d]
    logits_t = h_t · Eᵀ                                              # the item table is the output layer

**Positions count real tokens** (from the oldest item of the row) instead of being right-aligned. With a
causal mask, the hidden state at position t then depends only on items x_{≤t} and their positions 0..t — the
same numbers as running the prefix x_{≤t} alone — so (1) the number of padding columns cannot change a real
token's hidden state (the user vector of a history is the same in any batch) and (2) training on whole
sequences with a target at every position is *exactly* the "every prefix → next item" objective. Right-aligned
positions (the original SASRec) would give the item at t a position that depends on how many items come
after it, which differs between training (full sequence) and inference (prefix ending at t).
The positional table is zero-initialised: a position no training sequence reaches (training inputs are at
most ``max_len − 3`` items long, evaluation histories up to ``max_len − 1``) then adds nothing instead of
noise.

Masking: query t attends to keys s ≤ t that are real tokens, and always to itself. The self-edge changes
nothing for real queries (t itself is a real key) but gives padding queries one unmasked key, so no softmax
row is all −∞ (which would be NaN and leak through the backward pass). Padding positions are zeroed after
every block; they are never attended to by real tokens.

``user_vectors(batch)`` is the hidden state at the last column (histories are left-padded, so that is the
most recent item); scores are ``user_vectors · Eᵀ``, E = ``item_embeddings()`` (row 0 = padding, never
ranked).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _FullSoftmaxCE(torch.autograd.Function):
    """mean_n [logsumexp_i(h_n · E_i) − h_n · E_{t_n}] with a hand-written backward.

    Autograd's ``cross_entropy(h @ Eᵀ)`` keeps log-probabilities, then builds a dense one-hot gradient and
    runs ``log_softmax_backward``: about nine passes over the N × I logits, which on a CPU cost more than the
    matrix products. Here the forward turns the logits into probabilities in place (kept for backward) and
    the backward scales them once and subtracts the one-hot at N entries. Deterministic (no atomics).
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, E: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = h @ E.T  # [N, I]
        m = p.amax(1, keepdim=True)
        t_logit = p.gather(1, targets[:, None])
        p.sub_(m).exp_()
        s = p.sum(1, keepdim=True)
        p.div_(s)
        loss = (m + s.log() - t_logit).mean()
        ctx.save_for_backward(h, E, targets, p)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, E, targets, p = ctx.saved_tensors
        scale = grad / p.shape[0]
        g = p * scale  # out of place: a second backward (retain_graph) must still see the probabilities
        g[torch.arange(g.shape[0], device=g.device), targets] -= scale
        dh = g @ E if ctx.needs_input_grad[0] else None
        dE = g.T @ h if ctx.needs_input_grad[1] else None
        return dh, dE, None


def full_softmax_ce(h: torch.Tensor, E: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``h @ E.T`` ([N, d] × [I, d]) against class indices ``targets`` [N] in
    0..I-1 — equal to ``F.cross_entropy(h @ E.T, targets)``, with less memory traffic (``_FullSoftmaxCE``)."""
    if h.shape[0] == 0:
        raise ValueError("full_softmax_ce needs at least one row")
    return _FullSoftmaxCE.apply(h, E, targets)


class _Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then + FFN(LN(·))."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.ln_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        qkv = self.qkv(self.ln_attn(x)).view(B, L, 3, self.n_heads, d // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, L, d_head]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, d)))
        return x + self.drop(self.ffn(self.ln_ffn(x)))


class SASRec(nn.Module):
    """Causal self-attention next-item model; see the module docstring for the exact computation.

    ``n_items`` real items have ids 1..n_items; the item table has ``n_items + 1`` rows, row 0 the padding
    (kept at zero: ``padding_idx=0``). ``max_len`` is the longest history the positional table covers; longer
    inputs keep their last ``max_len`` columns.
    """

    def __init__(self, n_items: int, dim: int = 64, n_blocks: int = 2, n_heads: int = 1, max_len: int = 50,
                 dropout: float = 0.2, ffn_dim: int | None = None):
        super().__init__()
        if n_items < 1 or dim < 1 or n_blocks < 0 or n_heads < 1 or max_len < 1:
            raise ValueError(f"bad SASRec sizes: n_items={n_items} dim={dim} n_blocks={n_blocks} "
                             f"n_heads={n_heads} max_len={max_len}")
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of n_heads ({n_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.n_items, self.dim, self.max_len = n_items, dim, max_len
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, n_heads, ffn_dim or dim, dropout) for _ in range(n_blocks))
        self.ln_final = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # √d-scaled N(0, 1/d) item rows enter the residual stream at unit scale per coordinate, and the tied
        # output logits h·E start at O(1) spread; N(0, 1) rows (nn.Embedding's default) make the initial
        # softmax far too peaked for 10⁴ items.
        nn.init.normal_(self.item_emb.weight, std=1.0 / math.sqrt(self.dim))
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        nn.init.zeros_(self.pos_emb.weight)  # untrained positions add nothing (module docstring)
        for blk in self.blocks:
            for lin in (blk.qkv, blk.proj, blk.ffn[0], blk.ffn[2]):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def item_embeddings(self) -> torch.Tensor:
        """The item table [n_items + 1, d] (row 0 = padding, zero): the output layer and the export."""
        return self.item_emb.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, L, d] of left-padded ids [B, L]; padding positions are zero."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.max_len:
            input_ids = input_ids[:, -self.max_len :]
        real = input_ids != 0
        pos = (real.long().cumsum(1) - 1).clamp_min(0)
        keep = real.unsqueeze(-1).to(self.item_emb.weight.dtype)
        x = (self.item_emb(input_ids) * math.sqrt(self.dim) + self.pos_emb(pos)) * keep
        x = self.emb_drop(x)
        L = input_ids.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
        eye = torch.eye(L, dtype=torch.bool, device=input_ids.device)
        # [B, 1, L, L]: key s visible to query t iff s ≤ t and s is real, or s = t (no all-masked rows)
        attn_mask = (causal & real[:, None, :] | eye).unsqueeze(1)
        for blk in self.blocks:
            x = blk(x, attn_mask) * keep
        return self.ln_final(x) * keep

    def user_vectors(self, batch: dict) -> torch.Tensor:
        """[B, d]: the hidden state of the most recent item (last column of the left-padded history)."""
        return self.forward(batch["input_ids"])[:, -1]

    def scores(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-item logits [B, n_items + 1] at the last position (column 0 is padding)."""
        return self.forward(input_ids)[:, -1] @ self.item_embeddings().T


def sasrec_from_export(path, device: str | torch.device = "cpu") -> tuple[SASRec, dict]:
    """The model rebuilt from a ``sasrec_model.safetensors`` export (``hellm-ds pretrain-seq``), in eval mode,
    and the export's metadata (sizes from its recorded ``config``). Tensor bytes checked against the header."""
    from hellm_ds.errors import UsageError
    from hellm_ds.utils.checkpoint import load_tensors

    tensors, meta = load_tensors(path)
    if meta.get("kind") != "sasrec":
        raise UsageError(f"{path} is not a SASRec model export")
    c = meta.get("config", {})
    model = SASRec(int(meta["n_items"]), dim=c.get("dim", 64), n_blocks=c.get("n_blocks", 2),
                   n_heads=c.get("n_heads", 1), max_len=c.get("max_len", 50), dropout=c.get("dropout", 0.2),
                   ffn_dim=c.get("ffn_dim"))
    model.load_state_dict(tensors)
    return model.to(device).eval(), meta
