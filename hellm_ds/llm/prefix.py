r"""The graph-conditioned prefix (METHOD §5): a Gram-matrix encoder and its injection into every layer.

**Encoder** (``GramPrefixEncoder``, runs once per batch at the top of ``HeLLM.forward``). For a history
(i_1..i_n) with graph item embeddings X = (g_{i_1}..g_{i_n}) ∈ R^{n×d} (padding rows zeroed)::

    G    = XᵀX ∈ R^{d×d}, flattened to d²                    (computed in fp32)
    k    = norm_k⁰(MLP_k(G)),   v = norm_v⁰(MLP_v(G))        MLP: d² → h → w, GELU + dropout after each linear
    K̃[ℓ] = norm_k(P_k[ℓ] + k),  Ṽ[ℓ] = norm_v(P_v[ℓ] + v)    P_k, P_v ∈ R^{n_layers × L_p × w}, learned

norm = RMSNorm with a learned gain (the authors' ``gnn_global_*norm``); the MLP shape (a GELU and a dropout
after *both* linears) is the authors' ``gnn_global_key/value``. Two modes (``HeLLMConfig.prefix_mode``):

- ``hidden`` (METHOD): w = H. Layer ℓ's prefix keys/values are its own frozen projections
  ``k_proj(K̃[ℓ])``, ``v_proj(Ṽ[ℓ])`` (bias and any LoRA of those modules included), reshaped per kv-head.
- ``kv``: w = n_kv·head_dim, and K̃[ℓ], Ṽ[ℓ] *are* the prefix keys/values (RMSNorm per kv-head over
  head_dim); no frozen weight is touched. Same parameter count as ``hidden`` for multi-head attention.

No rotary embedding is applied to prefix keys (as the authors); every query attends to all L_p of them.

**Injection.** Each decoder layer's ``self_attn`` is wrapped in ``PrefixAttention``. HeLLM passes the
encoder's output down the decoder as one extra keyword argument (``hellm_prefix``; the LLaMA-family decoder
forwards unknown keyword arguments to each layer and each layer to its ``self_attn``). The wrapper takes its
layer's slice, projects it through the layer's own ``k_proj``/``v_proj`` (mode ``hidden``), and hands the
inner attention a one-shot cache object (``PrefixKV``) in place of the decoder's cache: the attention's own
``cache.update(key, value, layer_idx)`` — called after rotary, right before the attention kernel — returns
``[prefix ; current]`` along the sequence axis. The attention kernel itself (eager, SDPA, flash attention,
flex) is untouched: it sees keys/values of length L_p + L exactly as when continuing from a pre-filled cache.
Eager and SDPA are tested against a plain-PyTorch reference to 1e-5 (``tests/llm/test_prefix.py``), and so
is transformers' ``flash_attention_2`` path (the 2-D mask unpads keys with the full mask and queries with its
last L columns; flash-attn's causal mask is bottom-right aligned) with flash-attn's CUDA kernel replaced by
the math it computes (``tests/llm/flash_reference.py``); the kernel itself needs a GPU.

The mask has to cover L_p + L keys with the prefix visible to every query, padding masked, and causality
among the real tokens. The decoder builds it once from the model-level ``cache`` it is given: HeLLM passes a
``PrefixMaskCache``, which holds nothing but reports L_p past tokens for every layer, plus the 2-D mask
``[1]*L_p ‖ attention_mask``. ``create_causal_mask`` then produces what it would for a pre-filled cache:
query t (offset L_p) sees keys s ≤ L_p + t that are not padding — for SDPA/eager a 4-D mask, for flash
attention the 2-D mask with bottom-right causal alignment. Since L_p ≥ 1 makes the key length differ from
the query length, SDPA always gets this explicit mask (never its ``is_causal`` shortcut, which would be
top-left aligned), and no query row is fully masked (the prefix is always visible). Position ids are passed
explicitly (the real tokens count from 0 after the left padding), so rotary never sees the prefix length.

Why not write the prefix into a real ``DynamicCache`` (``cache.update(prefix, layer_idx)`` before the inner
attention runs)? It works, but (1) HF's gradient checkpointing replaces the layer's ``cache`` argument with
``None`` during training (``GradientCheckpointingLayer``), which would silently drop the prefix, and (2) a
checkpointed layer replayed in backward would append the prefix twice. The per-call ``PrefixKV`` carries no
state between calls and does not depend on the decoder-level cache at all, so both cases are exact; the
decoder-level ``PrefixMaskCache`` only sizes the mask, which is built before any layer runs.

**ZeRO-3.** The frozen ``k_proj``/``v_proj`` are only used through module calls inside the wrapper's (i.e.
the decoder layer's) forward, where ZeRO-3 gathers them; the encoder's own parameters are used only inside
``GramPrefixEncoder.forward``. Nothing reads a weight outside the forward of the module that owns it, and
sizes come from the config, never from a (possibly partitioned, empty) parameter's shape.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from hellm_ds.llm.backbone import cache_kwarg, decoder_layers

PREFIX_KWARG = "hellm_prefix"  # keyword argument carrying (keys, values) down the decoder
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


class RMSNorm(nn.Module):
    """x / rms(x) · gain over the last dim, computed in fp32 (as LLaMA's)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float, dtype) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden, dtype=dtype), nn.GELU(), nn.Dropout(dropout),
        nn.Linear(hidden, d_out, dtype=dtype), nn.GELU(), nn.Dropout(dropout),
    )


def gram_features(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flattened Gram matrices ``XᵀX`` [B, d²] (fp32) of ``x`` [B, n, d], padding rows (mask 0) zeroed."""
    x = x.float() * mask[..., None].to(torch.float32)
    return (x.transpose(1, 2) @ x).flatten(1)


class GramPrefixEncoder(nn.Module):
    """Gram matrix of the history's graph embeddings → per-layer prefix inputs (see the module docstring).

    ``forward(graph_x [B, n, d], mask [B, n]) -> (keys, values)``:
    mode ``hidden``: each [n_layers, B, L_p, H] (hidden space, to be projected by each layer);
    mode ``kv``: each [n_layers, B, n_kv, L_p, head_dim] (key/value space, used as is).
    """

    def __init__(self, graph_dim: int, hidden_size: int, n_layers: int, n_kv_heads: int, head_dim: int,
                 prefix_len: int, mode: str = "hidden", mlp_hidden: int | None = None, dropout: float = 0.3,
                 eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        if mode not in ("hidden", "kv"):
            raise ValueError(f"mode must be 'hidden' or 'kv', got {mode!r}")
        self.mode, self.n_layers, self.prefix_len = mode, n_layers, prefix_len
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        width = hidden_size if mode == "hidden" else n_kv_heads * head_dim
        mlp_hidden = mlp_hidden or hidden_size
        self.mlp_k = _mlp(graph_dim * graph_dim, mlp_hidden, width, dropout, dtype)
        self.mlp_v = _mlp(graph_dim * graph_dim, mlp_hidden, width, dropout, dtype)
        self.norm_k_in = RMSNorm(width, eps, dtype)
        self.norm_v_in = RMSNorm(width, eps, dtype)
        self.prefix_k = nn.Parameter(torch.randn(n_layers, prefix_len, width, dtype=dtype))
        self.prefix_v = nn.Parameter(torch.randn(n_layers, prefix_len, width, dtype=dtype))
        out = hidden_size if mode == "hidden" else head_dim  # kv mode: one RMS per kv-head
        self.norm_k = RMSNorm(out, eps, dtype)
        self.norm_v = RMSNorm(out, eps, dtype)

    def context(self, graph_x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The global context (k, v), each [B, width]."""
        g = gram_features(graph_x, mask).to(self.prefix_k.dtype)
        return self.norm_k_in(self.mlp_k(g)), self.norm_v_in(self.mlp_v(g))

    def forward(self, graph_x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.context(graph_x, mask)
        keys = self.prefix_k[:, None] + k[None, :, None, :]  # [n_layers, B, L_p, width]
        values = self.prefix_v[:, None] + v[None, :, None, :]
        if self.mode == "hidden":
            return self.norm_k(keys), self.norm_v(values)
        shape = (*keys.shape[:-1], self.n_kv_heads, self.head_dim)
        keys = self.norm_k(keys.view(shape)).transpose(2, 3)  # [n_layers, B, n_kv, L_p, head_dim]
        values = self.norm_v(values.view(shape)).transpose(2, 3)
        return keys.contiguous(), values.contiguous()


class PrefixKV:
    """A one-shot stand-in for a layer's KV cache: ``update`` returns ``[prefix ; current]`` and keeps
    nothing, so a replay (activation checkpointing) computes the same thing again."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values  # [B, n_kv, L_p, head_dim]

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys.shape[-2]


class _PrefixSlot(CacheLayerMixin):
    """A cache layer that reports ``prefix_len`` past tokens and stores nothing."""

    is_sliding = False

    def __init__(self, prefix_len: int):
        super().__init__()
        self.prefix_len = prefix_len

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover - never stores
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "PrefixMaskCache.update was called: a decoder layer's self_attn is not wrapped in "
            "PrefixAttention (wrap_attention), so its prefix would be missing"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.prefix_len + query_length, 0

    def get_seq_length(self) -> int:
        return self.prefix_len

    def get_max_length(self) -> int:
        return -1


class PrefixMaskCache(Cache):
    """Decoder-level cache that only sizes the attention mask: every layer has ``prefix_len`` past tokens.
    The keys/values themselves come from each layer's ``PrefixAttention``."""

    def __init__(self, prefix_len: int, n_layers: int):
        super().__init__(layers=[_PrefixSlot(prefix_len) for _ in range(n_layers)])


class PrefixAttention(nn.Module):
    """Wraps a LLaMA-family attention module (``base_layer``) so that it attends to its layer's prefix too.

    ``forward(*args, hellm_prefix=(keys, values), **kwargs)``: ``keys``/``values`` are the encoder's output
    for all layers; this layer takes index ``layer_idx``. Without ``hellm_prefix`` the call goes straight to
    ``base_layer`` (prefix off). ``project=True`` (mode ``hidden``) maps the [B, L_p, H] slice through
    ``base_layer.k_proj``/``v_proj``; ``project=False`` (mode ``kv``) uses [B, n_kv, L_p, head_dim] as is.
    """

    def __init__(self, base_layer: nn.Module, layer_idx: int, n_kv_heads: int, head_dim: int, project: bool):
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx, self.n_kv_heads, self.head_dim = layer_idx, n_kv_heads, head_dim
        self.project = project
        self._cache_arg = cache_kwarg(base_layer.forward)

    def prefix_kv(self, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's prefix keys/values [B, n_kv, L_p, head_dim] (no rotary), in ``dtype`` (the layer's
        activations) if given."""
        k, v = keys[self.layer_idx], values[self.layer_idx]
        if dtype is not None:
            k, v = k.to(dtype), v.to(dtype)
        if self.project:
            shape = (*k.shape[:-1], self.n_kv_heads, self.head_dim)  # [B, L_p, n_kv, head_dim]
            k = self.base_layer.k_proj(k).view(shape).transpose(1, 2)
            v = self.base_layer.v_proj(v).view(shape).transpose(1, 2)
        return k, v

    def forward(self, *args, **kwargs):
        prefix = kwargs.pop(PREFIX_KWARG, None)
        if prefix is None:
            return self.base_layer(*args, **kwargs)
        for name in _CACHE_NAMES:  # the decoder-level cache (a PrefixMaskCache, or None under checkpointing)
            kwargs.pop(name, None)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        kwargs[self._cache_arg] = PrefixKV(*self.prefix_kv(*prefix, dtype=hidden.dtype))
        return self.base_layer(*args, **kwargs)


def wrap_attention(decoder: nn.Module, n_kv_heads: int, head_dim: int, project: bool) -> None:
    """Replace every ``layers[i].self_attn`` by ``PrefixAttention(self_attn, i, …)`` in place."""
    for i, layer in enumerate(decoder_layers(decoder)):
        attn = layer.self_attn
        if isinstance(attn, PrefixAttention):
            raise ValueError(f"layer {i} is already wrapped")
        idx = getattr(attn, "layer_idx", i)
        if idx != i:
            raise ValueError(f"layer {i}'s attention has layer_idx {idx}")
        layer.self_attn = PrefixAttention(attn, i, n_kv_heads, head_dim, project)


def prefix_attention_mask(attention_mask: torch.Tensor, prefix_len: int) -> torch.Tensor:
    """``[1]*prefix_len ‖ attention_mask`` — the 2-D mask over prefix + sequence keys."""
    ones = attention_mask.new_ones(attention_mask.shape[0], prefix_len)
    return torch.cat([ones, attention_mask], dim=1)


def prefix_last_mask(attention_mask: torch.Tensor, prefix_len: int, n_last: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask [B, 1, L, prefix_len + L] (0 = attend, dtype's min = masked) over prefix + sequence
    keys in which only the last ``n_last`` queries see the prefix; every query sees the non-padding keys up to
    itself. For ``prefix_queries="last"``: a position that predicts item t+1 must not see the prefix built from
    the whole history. A padding query sees nothing (a uniform row over masked keys; its output is never
    read), so no row is NaN."""
    B, L = attention_mask.shape
    q = torch.arange(L, device=attention_mask.device)
    causal = (q[None, :] <= q[:, None])[None] & attention_mask.bool()[:, None, :]  # [B, L, L]
    sees_prefix = (q >= L - n_last)[None, :, None].expand(B, L, prefix_len)
    allowed = torch.cat([sees_prefix, causal], dim=-1)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]
