"""HeLLM as a whole: LoRA placement, trainable scopes, one dtype, the item head and the evaluator, export of
the trainable state, SDPA ≡ eager, stage-1 table loading, and a loss that falls on synthetic data."""
import pytest
import torch

from hellm_ds.data.batching import NextItemExamples
from hellm_ds.data.dataset import load_dataset
from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.eval.evaluator import evaluate
from hellm_ds.llm import HeLLMConfig, build_hellm, load_item_tables
from hellm_ds.utils.checkpoint import export_tensors

from tests.llm.common import ROWS, batch, model, tables, train_steps


def _lora_layers(m):
    from peft.tuners.lora import LoraLayer

    return {n: mod for n, mod in m.named_modules() if isinstance(mod, LoraLayer)}


def test_lora_default_placement_and_hyperparameters():
    m = model(prefix_mode="hidden")
    lora = _lora_layers(m)
    expected = {f"backbone.layers.{i}.mlp.{p}" for i in range(m.n_layers)
                for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(lora) == expected
    for mod in lora.values():
        assert mod.r["default"] == 16 and mod.scaling["default"] == pytest.approx(16 / 16)
        assert mod.lora_dropout["default"].p == pytest.approx(0.05)


def test_lora_is_configurable():
    m = model(lora_targets=("q_proj", "v_proj"), lora_r=4, lora_alpha=8, lora_dropout=0.1)
    lora = _lora_layers(m)
    assert {n.rsplit(".", 1)[-1] for n in lora} == {"q_proj", "v_proj"} and len(lora) == 2 * m.n_layers
    for mod in lora.values():
        assert mod.r["default"] == 4 and mod.scaling["default"] == pytest.approx(2.0)
        assert mod.lora_dropout["default"].p == pytest.approx(0.1)
    # the prefix projection goes through the (now adapted) k_proj/v_proj modules: still exact
    from tests.llm.common import reference_hidden

    b = batch(ROWS)
    with torch.no_grad():
        h, mask = m.hidden_states(b)
        r, rmask = reference_hidden(m, b)
    torch.testing.assert_close(h[rmask], r[rmask], rtol=0, atol=1e-5)
    assert not _lora_layers(model(lora_r=0))
    with pytest.raises(UsageError, match="LoRA targets"):
        model(lora_targets=("no_such_proj",))


@pytest.mark.parametrize("mode", ["hidden", "kv", "off"])
def test_trainable_parameters_per_scope(mode):
    m = model(prefix_mode=mode)
    names = {n for n, _ in m.named_parameters()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    expected = {n for n in names if ".lora_" in n or n.split(".")[0] in ("projector", "prefix", "head")}
    assert trainable == expected
    assert any(n.startswith("prefix.") for n in trainable) == (mode != "off")
    tops = {"backbone", "projector", "head"} | ({"prefix"} if mode != "off" else set())
    assert {n.split(".")[0] for n in trainable} == tops
    assert not any("norm" in n and n.startswith("backbone.") for n in trainable)  # backbone RMSNorms frozen
    assert {"prefix.norm_k.weight", "prefix.norm_v_in.weight"} <= trainable or mode == "off"
    assert set(m.trainable_state_dict()) == trainable

    full = model(prefix_mode=mode, trainable_scope="full")
    assert all(p.requires_grad for p in full.parameters())
    assert not any(n.startswith("graph_items") for n, _ in full.named_parameters())  # tables are buffers
    assert "graph_items" not in full.state_dict()  # and never checkpointed


def test_one_dtype_bf16():
    graph, seq = tables()
    m = build_hellm(HeLLMConfig(prefix_len=3, dtype="bfloat16"), graph, seq, seed=0).eval()
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}  # LoRA and the new modules included
    assert m.graph_items.dtype == m.seq_items.dtype == torch.float32  # frozen tables: fp32 buffers
    with torch.no_grad():
        logits = m(batch(ROWS))
    assert logits.dtype == torch.float32 and torch.isfinite(logits[:, 1:]).all()


def test_head_scores_match_forward_and_padding_column_is_never_predicted():
    m = model()
    b = batch(ROWS, targets=[1, 2, 3, 4])
    with torch.no_grad():
        logits = m(b)
        u = m.user_vectors(b)
    assert u.shape == (len(ROWS), m.hidden_size) and logits.shape == (len(ROWS), m.n_items + 1)
    assert torch.isneginf(logits[:, 0]).all()
    torch.testing.assert_close((u @ m.head.weight.T + m.head.bias)[:, 1:], logits[:, 1:], rtol=0, atol=1e-5)
    loss = m.loss(b)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, b["targets"]))


def test_tied_head_scores_are_the_projected_item_table():
    m = model(item_head="tied")
    with torch.no_grad():
        m.head.bias.copy_(0.1 * torch.randn(m.n_items + 1))
    b = batch(ROWS, targets=[1, 2, 3, 4])
    assert not hasattr(m.head, "weight")  # no I×H matrix: only a bias of its own
    with torch.no_grad():
        logits = m(b)
        u = m.user_vectors(b)
        table = m.projector(torch.cat([m.graph_items, m.seq_items], -1))
    assert torch.isneginf(logits[:, 0]).all()
    torch.testing.assert_close((u @ table.T + m.head.bias)[:, 1:], logits[:, 1:], rtol=0, atol=1e-5)
    W, bias = m.item_scoring()
    torch.testing.assert_close(W, table, rtol=0, atol=1e-6)
    torch.testing.assert_close((u @ W.T + bias)[:, 1:], logits[:, 1:], rtol=0, atol=1e-5)
    # the projector gets gradient from both sides (prompt tokens and scores); the bias trains
    m.train()
    m.loss(b).backward()
    assert m.head.bias.grad is not None and m.head.bias.grad.abs().sum() > 0
    assert m.projector.fc2.weight.grad.abs().sum() > 0
    assert "head.bias" in m.trainable_state_dict() and "head.weight" not in m.trainable_state_dict()
    with pytest.raises(UsageError, match="item_head"):
        HeLLMConfig(item_head="shared")


def test_trainable_state_round_trip():
    a, b_ = model(seed=0), model(seed=1)
    b = batch(ROWS)
    with torch.no_grad():
        assert (a(b) - b_(b))[:, 1:].abs().max() > 1e-4
    # same frozen backbone (seed 0) for the receiving model, other trainable values
    c = model(seed=0)
    with torch.no_grad():
        for p in c.parameters():
            if p.requires_grad:
                p.add_(0.1)
    c.load_trainable_state_dict(a.trainable_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(c(b), a(b), rtol=0, atol=0)
    with pytest.raises(UsageError, match="mismatch"):
        c.load_trainable_state_dict({"head.weight": a.head.weight})


@pytest.mark.parametrize("mode", ["hidden", "kv", "off"])
def test_sdpa_and_eager_agree(mode):
    sdpa, eager = model(prefix_mode=mode), model(prefix_mode=mode, attn_implementation="eager", seed=5)
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.backbone.config._attn_implementation == "sdpa"
    assert eager.backbone.config._attn_implementation == "eager"
    b = batch(ROWS)
    with torch.no_grad():
        torch.testing.assert_close(eager(b)[:, 1:], sdpa(b)[:, 1:], rtol=0, atol=1e-5)


def test_item_tables_from_stage1_exports(tmp_path):
    graph, seq = tables(n_items=12)
    export_tensors(tmp_path / "graph_embeddings.safetensors", {"item": graph, "user": torch.zeros(3, 8)}, {},
                   "fp")
    export_tensors(tmp_path / "sequential_item_embeddings.safetensors", {"item": seq}, {}, "fp")
    g, s = load_item_tables(tmp_path, n_items=12)
    assert torch.equal(g, graph) and torch.equal(s, seq)
    with pytest.raises(DataFormatError, match="shape"):
        load_item_tables(tmp_path, n_items=13)
    export_tensors(tmp_path / "sequential_item_embeddings.safetensors", {"item": seq[:-1]}, {}, "fp")
    with pytest.raises(DataFormatError, match="item rows"):
        load_item_tables(tmp_path)
    with pytest.raises(UsageError, match="same rows"):
        build_hellm(HeLLMConfig(prefix_len=2, dtype="float32"), graph, seq[:-1])


@pytest.fixture(scope="module")
def synth(synth_dir):
    return load_dataset(synth_dir)


def test_loss_falls_and_evaluator_ranks_with_the_head(synth):
    torch.manual_seed(0)
    graph = torch.randn(synth.n_items + 1, 8)
    seq = torch.randn(synth.n_items + 1, 6)
    graph[0] = seq[0] = 0
    m = build_hellm(HeLLMConfig(prefix_len=4, dtype="float32"), graph, seq, seed=0)
    examples = NextItemExamples(synth, "train", max_len=12)
    b = examples.collate(range(0, 16))
    m.train()
    losses = train_steps(m, b)
    assert losses[-1] < 0.5 * losses[0], losses
    m.eval()
    kw = dict(protocols=("paper", "filtered"), batch_size=128, progress=False)
    W, bias = m.item_scoring()
    # the linear head's scores, computed from the model's parts: u · Wᵀ + b must be forward's logits
    with torch.no_grad():
        logits, u = m(b), m.user_vectors(b)
    assert W.shape == (m.n_items + 1, m.hidden_size) and bias.shape == (m.n_items + 1,)
    assert W.dtype == bias.dtype == torch.float32 and not W.requires_grad and not bias.requires_grad
    torch.testing.assert_close((u @ W.T + bias)[:, 1:], logits[:, 1:], rtol=0, atol=1e-5)
    with torch.no_grad():  # detached copies: changing them leaves the model's scores alone
        W.add_(1.0)
        bias.add_(1.0)
        torch.testing.assert_close(m(b), logits, rtol=0, atol=0)
    W, bias = m.item_scoring()
    via_head = evaluate(synth, "valid", m.user_vectors, item_vectors=W, item_bias=bias, **kw)
    via_logits = evaluate(synth, "valid", m, **kw)
    for protocol in via_head:
        for k, v in via_head[protocol].items():
            assert v == pytest.approx(via_logits[protocol][k], abs=2e-3), (protocol, k)
