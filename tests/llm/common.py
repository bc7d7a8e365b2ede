"""Shared helpers for the stage-2 model tests: tiny item tables, batches, cousin backbones, and an explicit
plain-PyTorch reference of the whole HeLLM decoder pass (weights read directly, no HF modules called)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hellm_ds.llm import HeLLM, HeLLMConfig, build_hellm
from hellm_ds.llm.backbone import build_offline_tokenizer

N_ITEMS, D_G, D_S = 30, 8, 6


def tables(n_items: int = N_ITEMS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    graph = torch.randn(n_items + 1, D_G, generator=g)
    seq = torch.randn(n_items + 1, D_S, generator=g)
    graph[0] = 0
    seq[0] = 0
    return graph, seq


def batch(rows: list[list[int]], targets: list[int] | None = None, width: int | None = None) -> dict:
    """Left-padded batch like ``NextItemExamples.collate`` (``width`` ≥ the longest row)."""
    width = width or max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, width - len(r):] = torch.tensor(r)
    return {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "targets": torch.tensor(targets if targets is not None else [1] * len(rows)),
        "lengths": torch.tensor([len(r) for r in rows]),
    }


ROWS = [[3, 7, 1, 9, 4], [12, 5], [8, 8, 2, 30], [6]]


def model(seed: int = 0, randomize_lora: bool = True, **overrides) -> HeLLM:
    """A tiny fp32 HeLLM in eval mode; LoRA B matrices made non-zero so the adapters do something."""
    cfg = HeLLMConfig(**{"model": "tiny", "prefix_len": 3, "dtype": "float32", **overrides})
    graph, seq = tables()
    m = build_hellm(cfg, graph, seq, seed=seed)
    if randomize_lora:
        perturb_lora(m, seed)
    return m.eval()


def train_steps(m: HeLLM, b: dict, steps: int = 30, lr: float = 3e-3) -> list[float]:
    """``steps`` Adam steps of ``m.loss(b)`` on one fixed batch; the losses."""
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = m.loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def perturb_lora(m: HeLLM, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".lora_B." in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def cousin_model(family: str, cfg: HeLLMConfig, seed: int = 0) -> HeLLM:
    """HeLLM around a tiny random Mistral/Qwen2/Llama decoder (same module layout as LLaMA)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    tok = build_offline_tokenizer([cfg.instruction, cfg.response])
    kw = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, pad_token_id=0)
    config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family](**kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                              attn_implementation=cfg.attn_implementation)
        graph, seq = tables()
        m = HeLLM(cfg, lm.base_model, tok, graph, seq, dtype=torch.float32)
        if family == "qwen2":  # make the q/k/v biases matter
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if n.endswith("_proj.bias") and "self_attn" in n:
                        p.normal_(0, 0.1)
    perturb_lora(m, seed)
    return m.eval()


# ---- reference ------------------------------------------------------------------------------------------
def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _linear(x, mod):
    """x Wᵀ + b (+ LoRA: scale · x Aᵀ Bᵀ) from the module's tensors, without calling the module."""
    base = getattr(mod, "base_layer", mod)
    y = x @ base.weight.T
    if base.bias is not None:
        y = y + base.bias
    if hasattr(mod, "lora_A") and "default" in mod.lora_A:
        A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        y = y + mod.scaling["default"] * (x @ A.T) @ B.T
    return y


def _rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    f = pos[..., None].float() * inv  # [B, L, hd/2]
    emb = torch.cat([f, f], -1)[:, None]  # [B, 1, L, hd]
    rot = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * emb.cos() + rot * emb.sin()


def reference_hidden(m: HeLLM, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states [B, L, H] and mask, computed from scratch: prompt built by a Python loop, the
    prefix from the METHOD formulas, each layer's attention over [prefix ; sequence] with an explicit mask."""
    dec = m.backbone
    c = dec.config
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    hd = c.hidden_size // nh
    eps = c.rms_norm_eps
    theta = c.rope_parameters["rope_theta"]
    ids, am = b["input_ids"], b["attention_mask"]
    B, n = ids.shape
    E = dec.embed_tokens.weight
    instr, resp = E[m.instruction_ids], E[m.response_ids]
    g, s = m.graph_items, m.seq_items
    P = m.projector
    rows, masks = [], []
    Ti, Tr = len(instr), len(resp)
    L = Ti + n + Tr
    for r in range(B):
        real = ids[r][am[r].bool()]
        x = torch.cat([g[real], s[real]], -1)
        soft = F.gelu(x @ P.fc1.weight.T + P.fc1.bias) @ P.fc2.weight.T + P.fc2.bias
        seq = torch.cat([instr, soft, resp])
        pad = L - len(seq)
        rows.append(torch.cat([torch.zeros(pad, seq.shape[1]), seq]))
        masks.append(torch.cat([torch.zeros(pad), torch.ones(len(seq))]))
    h = torch.stack(rows)
    mask = torch.stack(masks).bool()
    pos = (mask.long().cumsum(1) - 1).clamp(min=0)

    Lp = 0
    pk = pv = None
    if m.prefix is not None:
        enc = m.prefix
        Lp = enc.prefix_len
        X = g[ids] * am[..., None]
        G = torch.einsum("bnd,bne->bde", X, X).flatten(1)

        def mlp(seq_, x):
            l1, l2 = seq_[0], seq_[3]
            return F.gelu(F.gelu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias)

        k = _rms(mlp(enc.mlp_k, G), enc.norm_k_in.weight, eps)
        v = _rms(mlp(enc.mlp_v, G), enc.norm_v_in.weight, eps)
        pk, pv = [], []
        for ell in range(c.num_hidden_layers):
            if enc.mode == "hidden":
                kin = _rms(enc.prefix_k[ell][None] + k[:, None], enc.norm_k.weight, eps)  # [B, Lp, H]
                vin = _rms(enc.prefix_v[ell][None] + v[:, None], enc.norm_v.weight, eps)
                attn = dec.layers[ell].self_attn.base_layer
                kk = _linear(kin, attn.k_proj).view(B, Lp, nkv, hd).transpose(1, 2)
                vv = _linear(vin, attn.v_proj).view(B, Lp, nkv, hd).transpose(1, 2)
            else:
                kk = (enc.prefix_k[ell][None] + k[:, None]).view(B, Lp, nkv, hd)
                vv = (enc.prefix_v[ell][None] + v[:, None]).view(B, Lp, nkv, hd)
                kk = _rms(kk, enc.norm_k.weight, eps).transpose(1, 2)
                vv = _rms(vv, enc.norm_v.weight, eps).transpose(1, 2)
            pk.append(kk)
            pv.append(vv)

    qi = torch.arange(L)[:, None]
    ki = torch.arange(L)[None, :]
    allowed = (ki <= qi)[None] & mask[:, None, :]  # [B, L, L] causal + key padding
    allowed = torch.cat([torch.ones(B, L, Lp, dtype=torch.bool), allowed], -1)  # prefix always visible
    allowed = allowed | ~mask[:, :, None]  # padding queries: anything (never read)
    for ell, layer in enumerate(dec.layers):
        attn = getattr(layer.self_attn, "base_layer", layer.self_attn)  # unwrap PrefixAttention
        x = _rms(h, layer.input_layernorm.weight, eps)
        q = _linear(x, attn.q_proj).view(B, L, nh, hd).transpose(1, 2)
        k = _linear(x, attn.k_proj).view(B, L, nkv, hd).transpose(1, 2)
        v = _linear(x, attn.v_proj).view(B, L, nkv, hd).transpose(1, 2)
        q, k = _rope(q, pos, theta), _rope(k, pos, theta)
        if pk is not None:
            k = torch.cat([pk[ell], k], 2)
            v = torch.cat([pv[ell], v], 2)
        k = k.repeat_interleave(nh // nkv, 1)
        v = v.repeat_interleave(nh // nkv, 1)
        scores = (q @ k.transpose(2, 3)) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        o = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, nh * hd)
        h = h + _linear(o, attn.o_proj)
        x = _rms(h, layer.post_attention_layernorm.weight, eps)
        mlp = layer.mlp
        h = h + _linear(F.silu(_linear(x, mlp.gate_proj)) * _linear(x, mlp.up_proj), mlp.down_proj)
    return _rms(h, dec.norm.weight, eps), mask
