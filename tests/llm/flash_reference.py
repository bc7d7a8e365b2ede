"""flash-attn 2's Python API (``flash_attn_func``, ``flash_attn_varlen_func``, ``bert_padding``) in plain
PyTorch, so that transformers' real ``flash_attention_2`` path — its 2-D mask handling, the unpadding of
queries and of prefix + sequence keys, cu_seqlens — runs on a CPU. Only the CUDA kernel is replaced, by the
math it computes: softmax(q kᵀ · scale) v per sequence, grouped-query heads, and flash-attn ≥ 2.1's causal
mask aligned to the bottom-right corner (query j of Lq sees key s iff s ≤ j + Lk − Lq)."""
from __future__ import annotations

import contextlib
import sys
import types

import torch


def _attend(q, k, v, scale, causal):
    """One sequence: q [Lq, Hq, D], k/v [Lk, Hk, D] → [Lq, Hq, D] (fp32 math)."""
    lq, hq, _ = q.shape
    lk, hk, _ = k.shape
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    if causal:
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v.float()).to(q.dtype)


def _check(dropout_p, window_size, softcap, alibi_slopes):
    assert dropout_p == 0.0 and tuple(window_size) == (-1, -1) and not softcap and alibi_slopes is None, \
        "the reference implements plain (causal) attention only"


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    _check(dropout_p, window_size, softcap, alibi_slopes)
    CALLS["flash_attn_func"] += 1
    scale = softmax_scale or q.shape[-1] ** -0.5
    return torch.stack([_attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    _check(dropout_p, window_size, softcap, alibi_slopes)
    assert block_table is None
    CALLS["flash_attn_varlen_func"] += 1
    CALLS["key_lengths"].append((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist())
    scale = softmax_scale or q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for b in range(cu_seqlens_q.numel() - 1):
        qs = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
        ks = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
        out[qs] = _attend(q[qs], k[ks], v[ks], scale, causal)
    return out


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("paged decoding is not part of the reference")


CALLS: dict = {}


@contextlib.contextmanager
def reference_flash_attention(monkeypatch):
    """Within the block, ``attn_implementation="flash_attention_2"`` dispatches to the functions above."""
    import transformers.modeling_flash_attention_utils as fa_utils

    CALLS.clear()
    CALLS.update(flash_attn_func=0, flash_attn_varlen_func=0, key_lengths=[])
    module = types.ModuleType("flash_attn")
    module.__version__ = "2.7.4"
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = fa_utils._pad_input, fa_utils._unpad_input  # same API as flash-attn's
    module.bert_padding = padding
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    monkeypatch.setattr(fa_utils, "is_flash_attn_2_available", lambda *a, **k: True)
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        monkeypatch.setattr(fa_utils, name, None, raising=False)
    yield CALLS
