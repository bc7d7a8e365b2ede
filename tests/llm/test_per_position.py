"""The per-position objective: every history position predicts the next item in one forward, and no position
sees an item after it — neither through attention nor through the graph-conditioned prefix (built from the
whole history, so only the positions after the last item may attend to it: ``prefix_queries="last"``)."""
import numpy as np
import pytest
import torch

from hellm_ds.data.batching import SequenceExamples
from hellm_ds.errors import UsageError

from tests.llm.common import model, train_steps

ROWS = [[3, 7, 1, 9, 4, 11], [12, 5, 2], [8, 8, 2, 30, 6, 17]]


def seq_batch(rows):
    """A per-position batch like ``SequenceExamples.collate``: inputs t[:-1], next items t[1:]."""
    width = max(len(r) for r in rows) - 1
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    nxt = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) + 1:] = torch.tensor(r[:-1])
        nxt[b, width - len(r) + 1:] = torch.tensor(r[1:])
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "next_items": nxt,
            "targets": torch.tensor([r[-1] for r in rows])}


def position_logits(m, rows):
    """[B, n, I+1] logits per (row, input column), NaN where a column has no next item."""
    b = seq_batch(rows)
    with torch.no_grad():
        flat = m(b)
    out = torch.full((*b["input_ids"].shape, flat.shape[1]), float("nan"))
    out[b["next_items"] > 0] = flat
    return out


@pytest.mark.parametrize("prompt", ["items", "method"])
@pytest.mark.parametrize("prefix_mode", ["hidden", "kv"])
def test_no_position_sees_a_later_item(prompt, prefix_mode):
    m = model(prefix_mode=prefix_mode, prompt=prompt, prefix_queries="last")
    base = position_logits(m, ROWS)
    for t in range(1, 5):  # change row 0's input item at column t (and row 2's), keep the rest
        rows = [list(r) for r in ROWS]
        rows[0][t] = 20 + t
        rows[2][t] = 21 + t
        moved = position_logits(m, rows)
        width = base.shape[1]
        for b in (0, 2):
            c = width - len(ROWS[b]) + 1 + t  # the changed item's input column
            # earlier positions (which predict items up to t) are exactly unchanged
            torch.testing.assert_close(moved[b, :c], base[b, :c], rtol=0, atol=0, equal_nan=True)
            assert not torch.allclose(moved[b, c], base[b, c])  # it is an input of its own position
            assert not torch.allclose(moved[b, -1], base[b, -1])  # the final position sees it too
        torch.testing.assert_close(moved[1], base[1], rtol=0, atol=0, equal_nan=True)  # other rows: untouched


def test_leakage_test_detects_a_prefix_every_position_sees():
    """The same check on METHOD's prefix_queries="all" does see the future through the Gram prefix: the test
    above can fail. (``position_states`` refuses this combination; the hidden states show it directly.)"""
    m = model(prefix_mode="hidden", prompt="items", prefix_queries="all")
    b0 = seq_batch(ROWS)
    rows = [list(r) for r in ROWS]
    rows[0][4] = 25
    b1 = seq_batch(rows)
    with torch.no_grad():
        h0, _ = m.hidden_states(b0)
        h1, _ = m.hidden_states(b1)
    first = b0["input_ids"].shape[1] - len(ROWS[0]) + 1 + 1  # row 0's second prompt position (after BOS)
    assert not torch.allclose(h0[0, first], h1[0, first])
    with pytest.raises(UsageError, match="prefix_queries='last'"):
        m(b0)


def test_only_the_last_position_reads_the_prefix():
    """With prefix_queries="last" the prefix still reaches the final position (the one evaluation reads), and
    nothing else: perturbing the learned prefix tables moves the final logits only."""
    m = model(prefix_mode="hidden", prompt="items", prefix_queries="last")
    base = position_logits(m, ROWS)
    with torch.no_grad():
        m.prefix.prefix_k.add_(torch.randn_like(m.prefix.prefix_k))
        m.prefix.prefix_v.add_(torch.randn_like(m.prefix.prefix_v))
    moved = position_logits(m, ROWS)
    torch.testing.assert_close(moved[:, :-1], base[:, :-1], rtol=0, atol=0, equal_nan=True)
    assert not torch.allclose(moved[:, -1], base[:, -1])


def test_last_position_matches_the_next_item_forward():
    """The final column's per-position logits are the plain forward's (user_vectors) logits."""
    m = model(prefix_mode="hidden", prompt="items", prefix_queries="last", item_head="tied")
    b = seq_batch(ROWS)
    with torch.no_grad():
        per_pos = position_logits(m, ROWS)[:, -1]
        plain = m({k: b[k] for k in ("input_ids", "attention_mask", "targets")})
    torch.testing.assert_close(per_pos, plain, rtol=0, atol=1e-5)


def test_items_prompt_is_bos_and_items():
    m = model(prompt="items")
    assert m.instruction_ids.tolist() == [m.tokenizer.bos_token_id] and m.response_ids.numel() == 0
    emb, mask, _ = m.assemble(seq_batch(ROWS)["input_ids"], seq_batch(ROWS)["attention_mask"])
    assert emb.shape[1] == 1 + max(len(r) for r in ROWS) - 1


def test_flash_attention_refuses_a_per_query_prefix():
    from hellm_ds.llm import HeLLMConfig

    with pytest.raises(UsageError, match="4-D attention mask"):
        HeLLMConfig(prefix_queries="last", attn_implementation="flash_attention_2")


def test_sequence_examples_cover_every_training_target(synth_dir):
    """One row per user with ≥ 2 training items; its next items are exactly the prefixes' targets."""
    from hellm_ds.data.batching import NextItemExamples
    from hellm_ds.data.dataset import load_dataset

    ds = load_dataset(synth_dir)
    seqs = SequenceExamples(ds)
    b = seqs.collate(np.arange(len(seqs)))
    prefixes = NextItemExamples(ds, "train")
    assert int((b["next_items"] > 0).sum()) == seqs.n_targets == len(prefixes)
    got = sorted(zip(np.repeat(b["users"].numpy(), b["next_items"].shape[1])[b["next_items"].flatten() > 0],
                     b["next_items"][b["next_items"] > 0].tolist()))
    want = sorted(zip(prefixes.users.tolist(), prefixes.targets.tolist()))
    assert got == want
    assert torch.equal(b["targets"], b["next_items"][:, -1])
    # inputs shifted by one: each row's next items are its inputs from the second on, then the target
    for r in range(len(seqs)):
        ids, nxt = b["input_ids"][r], b["next_items"][r]
        real = ids > 0
        assert torch.equal(nxt[real][:-1], ids[real][1:])


def test_per_position_loss_falls():
    """A few optimiser steps on a fixed batch lower the per-position loss (the objective trains)."""
    m = model(prefix_mode="hidden", prompt="items", prefix_queries="last", item_head="tied",
              trainable_scope="full").train()
    torch.manual_seed(0)
    losses = train_steps(m, seq_batch(ROWS))
    assert losses[-1] < 0.5 * losses[0], losses
