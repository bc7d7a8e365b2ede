"""The graph-conditioned prefix (METHOD §5): exact against a plain-PyTorch reference (values and gradients,
LLaMA/Mistral/Qwen2, SDPA/eager, modes hidden/kv/off), present in every layer, conditioned on the graph,
absent when off, unchanged under activation checkpointing, and ZeRO-3-shaped (frozen weights used only
inside their own module's forward)."""
import pytest
import torch

from hellm_ds.llm import HeLLMConfig, PrefixAttention
from hellm_ds.llm import prefix as prefix_mod

from tests.llm.common import D_G, ROWS, batch, cousin_model, model, reference_hidden

ATOL = 1e-5


def _last(h, mask):
    assert mask[:, -1].all()
    return h[:, -1]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["hidden", "kv", "off"])
def test_exact_against_reference(mode, impl):
    m = model(prefix_mode=mode, attn_implementation=impl)
    b = batch(ROWS)
    h, mask = m.hidden_states(b)
    r, rmask = reference_hidden(m, b)
    assert torch.equal(mask.bool(), rmask)
    torch.testing.assert_close(h[rmask], r[rmask], rtol=0, atol=ATOL)
    # gradients of every trainable parameter agree as well
    w = torch.randn(m.hidden_size, generator=torch.Generator().manual_seed(1))
    params = [p for p in m.parameters() if p.requires_grad]
    g_model = torch.autograd.grad((_last(h, mask) @ w).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((_last(r, rmask) @ w).sum(), params, allow_unused=True)
    for (name, _), a, e in zip([(n, p) for n, p in m.named_parameters() if p.requires_grad], g_model, g_ref):
        if e is None:  # the head is not part of the hidden states
            assert a is None and name.startswith("head."), name
            continue
        torch.testing.assert_close(a, e, rtol=1e-4, atol=ATOL, msg=name)


def test_reference_sees_the_prefix():
    """The comparison above is sensitive: dropping the prefix from the reference changes the result."""
    m = model(prefix_mode="hidden")
    b = batch(ROWS)
    with torch.no_grad():
        h, mask = m.hidden_states(b)
        enc, m.prefix = m.prefix, None
        r, rmask = reference_hidden(m, b)
        m.prefix = enc
    assert (h[rmask] - r[rmask]).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@pytest.mark.parametrize("mode", ["hidden", "kv"])
def test_exact_for_cousins(family, mode):
    m = cousin_model(family, HeLLMConfig(prefix_len=3, prefix_mode=mode, dtype="float32"))
    b = batch(ROWS)
    with torch.no_grad():
        h, _ = m.hidden_states(b)
        r, rmask = reference_hidden(m, b)
    torch.testing.assert_close(h[rmask], r[rmask], rtol=0, atol=ATOL)


def test_every_layer_attends_to_its_prefix(monkeypatch):
    m = model(prefix_mode="hidden", attn_implementation="eager")
    b = batch(ROWS)
    Lp, L = m.cfg.prefix_len, len(m.instruction_ids) + b["input_ids"].shape[1] + len(m.response_ids)
    seen = []
    hooks = [layer.self_attn.base_layer.register_forward_hook(
        lambda mod, args, out, i=i: seen.append((i, out[1]))) for i, layer in enumerate(m.backbone.layers)]
    updates = []
    orig = prefix_mod.PrefixKV.update

    def spy(self, k, v, layer_idx=None, *a, **kw):
        out = orig(self, k, v, layer_idx, *a, **kw)
        updates.append((layer_idx, out[0].shape[-2], out[1].shape[-2]))
        return out

    monkeypatch.setattr(prefix_mod.PrefixKV, "update", spy)
    with torch.no_grad():
        m(b)
    for h in hooks:
        h.remove()
    n_layers = m.n_layers
    assert updates == [(i, Lp + L, Lp + L) for i in range(n_layers)]
    assert [i for i, _ in seen] == list(range(n_layers))
    for i, weights in seen:  # eager returns the attention weights [B, heads, L, Lp + L]
        assert weights.shape[-2:] == (L, Lp + L)
        prefix_mass = weights[..., :Lp].sum(-1)
        assert (prefix_mass > 1e-3).all(), f"layer {i} ignores its prefix"
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(prefix_mass))


@pytest.mark.parametrize("mode", ["hidden", "kv"])
def test_each_layer_uses_its_own_prefix(mode):
    m = model(prefix_mode=mode)
    b = batch(ROWS)
    with torch.no_grad():
        base = m(b)
        for ell in range(m.n_layers):
            for table in (m.prefix.prefix_k, m.prefix.prefix_v):
                saved = table[ell].clone()
                table[ell].add_(0.5)
                changed = (m(b) - base)[:, 1:].abs().max()
                table[ell].copy_(saved)
                assert changed > 1e-5, f"layer {ell} prefix has no effect"


@pytest.mark.parametrize("mode", ["hidden", "kv", "off"])
def test_graph_table_reaches_logits_only_through_the_prefix(mode):
    """With the projector blind to the graph half of [g ‖ s], the graph table can only act via the Gram
    prefix: it changes the logits iff the prefix is on."""
    m = model(prefix_mode=mode)
    b = batch(ROWS)
    with torch.no_grad():
        m.projector.fc1.weight[:, :D_G] = 0
        base = m(b)
        m.graph_items[1:] += torch.randn_like(m.graph_items[1:])
        changed = (m(b) - base)[:, 1:].abs().max().item()
    if mode == "off":
        assert changed == 0.0
    else:
        assert changed > 1e-4


def test_prefix_off_is_the_plain_decoder():
    m = model(prefix_mode="off")
    assert m.prefix is None
    assert not any(isinstance(x, PrefixAttention) for x in m.modules())
    assert not any(n.startswith("prefix.") for n, _ in m.named_parameters())
    b = batch(ROWS)
    with torch.no_grad():
        h, mask = m.hidden_states(b)
        embeds, mask2, pos = m.assemble(b["input_ids"], b["attention_mask"])
        plain = m.backbone(inputs_embeds=embeds, attention_mask=mask2, position_ids=pos).last_hidden_state
    torch.testing.assert_close(h[mask.bool()], plain[mask.bool()], rtol=0, atol=0)


def test_wrapping_twice_is_refused():
    m = model(prefix_mode="hidden")
    with pytest.raises(ValueError, match="already wrapped"):
        prefix_mod.wrap_attention(m.backbone, 2, 16, project=True)


def test_unwrapped_layer_with_prefix_mask_fails_loudly():
    m = model(prefix_mode="hidden")
    layer = m.backbone.layers[1]
    layer.self_attn = layer.self_attn.base_layer  # as if a layer had escaped wrap_attention
    with pytest.raises(RuntimeError, match="not wrapped"):
        m(batch(ROWS))


@pytest.mark.parametrize("mode", ["hidden", "kv"])
def test_activation_checkpointing_is_exact(mode):
    """HF gradient checkpointing strips the layer's cache argument; the prefix must survive it."""
    kw = dict(prefix_mode=mode, prefix_dropout=0.0, lora_dropout=0.0)
    plain, ckpt = model(**kw).train(), model(gradient_checkpointing=True, **kw).train()
    assert all(layer.gradient_checkpointing for layer in ckpt.backbone.layers)
    b = batch(ROWS, targets=[2, 4, 6, 8])
    losses = []
    for m in (plain, ckpt):
        loss = m.loss(b)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("mode", ["hidden", "kv", "off"])
def test_parameters_only_exist_inside_their_forward(mode):
    """A ZeRO-3 stand-in at module granularity: every module's own parameters are emptied, gathered by a
    forward pre-hook and emptied again after the forward. The model must give the same logits."""
    m = model(prefix_mode=mode)
    b = batch(ROWS)
    with torch.no_grad():
        expected = m(b)
    full = {}
    handles = []

    def gather(mod, *_):
        for p in mod.parameters(recurse=False):
            p.data = full[p]

    def release(mod, *_):
        for p in mod.parameters(recurse=False):
            p.data = torch.empty(0, dtype=p.dtype)

    for mod in m.modules():
        own = list(mod.parameters(recurse=False))
        if own:
            for p in own:
                full[p] = p.data
            release(mod)
            handles.append(mod.register_forward_pre_hook(gather))
            handles.append(mod.register_forward_hook(release))
    try:
        with torch.no_grad():
            got = m(b)
    finally:
        for h in handles:
            h.remove()
        for p, data in full.items():
            p.data = data
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["hidden", "kv", "off"])
@pytest.mark.parametrize("padded", [True, False])
def test_exact_through_transformers_flash_attention_2_path(monkeypatch, mode, padded):
    """transformers' flash_attention_2 integration (2-D mask, unpadding of queries and of prefix + sequence
    keys, cu_seqlens) with flash-attn's kernel replaced by its math (tests/llm/flash_reference.py)."""
    from tests.llm.flash_reference import reference_flash_attention

    m = model(prefix_mode=mode, attn_implementation="sdpa")
    rows = ROWS if padded else [r[:3] for r in ROWS if len(r) >= 3]
    b = batch(rows)
    r, rmask = reference_hidden(m, b)
    with reference_flash_attention(monkeypatch) as calls:
        m.backbone.config._attn_implementation = "flash_attention_2"
        h, mask = m.hidden_states(b)
    n_layers = m.backbone.config.num_hidden_layers
    if padded:  # every layer went through the varlen kernel, with the prefix in each sequence's keys
        assert calls["flash_attn_varlen_func"] == n_layers and calls["flash_attn_func"] == 0
        prefix = 0 if mode == "off" else m.cfg.prefix_len
        assert calls["key_lengths"][0] == (mask.sum(1) + prefix).tolist()
    else:
        assert calls["flash_attn_func"] == n_layers and calls["flash_attn_varlen_func"] == 0
    assert torch.equal(mask.bool(), rmask)
    torch.testing.assert_close(h[rmask], r[rmask], rtol=0, atol=ATOL)
