"""Score fusion with the stage-1 SASRec (``HeLLM.attach_sasrec``): the ranked scores are exactly HeLLM's own
plus w · the SASRec's, through the evaluator's dot-product form (user vectors · item table + bias); w = 0
ranks like HeLLM alone; a SASRec whose item table is not the one HeLLM reads is refused."""
import pytest
import torch

from hellm_ds.errors import UsageError
from hellm_ds.llm import HeLLMConfig, build_hellm
from hellm_ds.pretrain.sasrec import SASRec

from tests.llm.common import N_ITEMS, ROWS, batch, perturb_lora, tables


def fused_model(item_head="tied"):
    torch.manual_seed(0)
    sasrec = SASRec(N_ITEMS, dim=6, n_blocks=2, n_heads=2, max_len=8, dropout=0.3)
    graph, _ = tables()
    seq = sasrec.item_embeddings().detach().clone()
    cfg = HeLLMConfig(model="tiny", prefix_len=3, dtype="float32", item_head=item_head, prompt="items",
                      prefix_queries="last")
    m = build_hellm(cfg, graph, seq, seed=0)
    perturb_lora(m)
    return m.eval(), sasrec, graph, seq


@pytest.mark.parametrize("item_head", ["tied", "linear"])
@pytest.mark.parametrize("weight", [0.0, 0.5, 3.0])
def test_fused_scores_are_hellm_plus_weighted_sasrec(item_head, weight):
    m, sasrec, _, _ = fused_model(item_head)
    b = batch(ROWS, width=9)  # wider than the SASRec's max_len: it keeps the last columns
    with torch.no_grad():
        own = m(b)[:, 1:]
        m.attach_sasrec(sasrec, weight)
        W, bias = m.item_scoring()
        fused = (m.user_vectors(b) @ W.T + bias)[:, 1:]
        want = own + weight * sasrec.scores(b["input_ids"])[:, 1:]
        torch.testing.assert_close(fused, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(m(b)[:, 1:], own, rtol=0, atol=0)  # training's forward never fuses
    m.train()
    assert not m.sasrec.training and not any(p.requires_grad for p in m.sasrec.parameters())


def test_fusion_needs_the_sasrec_of_the_table_hellm_reads():
    m, sasrec, _, _ = fused_model()
    other = SASRec(N_ITEMS, dim=6, n_blocks=2, n_heads=2, max_len=8)
    with pytest.raises(UsageError, match="not the sequential item table"):
        m.attach_sasrec(other, 1.0)
