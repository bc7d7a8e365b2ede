"""Prompt assembly (METHOD §5): instruction tokens, soft item tokens, response tokens, left padding of the
whole row, position ids that skip padding — and logits that do not depend on the padding."""
import pytest
import torch

from tests.llm.common import ROWS, batch, model


@pytest.fixture(scope="module")
def m():
    return model(prefix_mode="hidden")


def test_layout_of_every_row(m):
    b = batch(ROWS)
    with torch.no_grad():
        embeds, mask, pos = m.assemble(b["input_ids"], b["attention_mask"])
        emb = m.backbone.get_input_embeddings()
        instr, resp = emb(m.instruction_ids), emb(m.response_ids)
    Ti, Tr, n = len(m.instruction_ids), len(m.response_ids), b["input_ids"].shape[1]
    L = Ti + n + Tr
    assert embeds.shape == (len(ROWS), L, m.hidden_size) and mask.shape == pos.shape == (len(ROWS), L)
    for r, items in enumerate(ROWS):
        pad = n - len(items)
        assert mask[r].tolist() == [0] * pad + [1] * (L - pad)
        assert pos[r].tolist() == [0] * pad + list(range(L - pad))  # real tokens count from 0
        assert torch.equal(embeds[r, :pad], torch.zeros(pad, m.hidden_size))
        assert torch.equal(embeds[r, pad:pad + Ti], instr)
        with torch.no_grad():
            soft = m.item_tokens(torch.tensor([items]))[0]
        torch.testing.assert_close(embeds[r, pad + Ti:pad + Ti + len(items)], soft, rtol=0, atol=1e-6)
        assert torch.equal(embeds[r, L - Tr:], resp)


def test_prompt_starts_with_bos_and_response_has_none(m):
    bos = m.tokenizer.bos_token_id
    assert m.instruction_ids[0].item() == bos
    assert bos not in m.instruction_ids[1:].tolist() and bos not in m.response_ids.tolist()


@pytest.mark.parametrize("mode", ["hidden", "kv", "off"])
def test_more_left_padding_changes_nothing(mode):
    mm = model(prefix_mode=mode)
    with torch.no_grad():
        tight = mm(batch(ROWS))
        wide = mm(batch(ROWS, width=max(map(len, ROWS)) + 7))
        alone = torch.cat([mm(batch([r])) for r in ROWS])  # no padding at all
    torch.testing.assert_close(wide, tight, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone, tight, rtol=0, atol=1e-5)


def test_history_order_and_content_matter(m):
    with torch.no_grad():
        a = m(batch([[3, 7, 1, 9]]))
        b = m(batch([[9, 1, 7, 3]]))  # same items, other order: positions (and causality) differ
        c = m(batch([[3, 7, 1, 10]]))
    assert (a - b)[:, 1:].abs().max() > 1e-4 and (a - c)[:, 1:].abs().max() > 1e-4


def test_padding_anywhere_is_treated_as_left_padding(m):
    """The collator left-pads; a right-padded (or holed) batch gives the same logits all the same."""
    left = batch(ROWS)
    right = {k: v.clone() for k, v in left.items()}
    for r, items in enumerate(ROWS):
        right["input_ids"][r] = 0
        right["input_ids"][r, :len(items)] = torch.tensor(items)
    right["attention_mask"] = (right["input_ids"] != 0).long()
    holed = {"input_ids": torch.tensor([[0, 3, 0, 7, 1, 0, 9, 4]])}
    holed["attention_mask"] = (holed["input_ids"] != 0).long()
    with torch.no_grad():
        torch.testing.assert_close(m(right), m(left), rtol=0, atol=1e-5)
        torch.testing.assert_close(m(holed), m(batch([ROWS[0]])), rtol=0, atol=1e-5)
