"""``--fusion sasrec`` through the real trainer: a SASRec pre-trained on the synthetic data (stage 1b), HeLLM
fine-tuned on its tables, every validation ranks HeLLM + w · SASRec for each w of FUSION_WEIGHTS and keeps the
best (logged), the export records the SASRec and w, and the reloaded export ranks test exactly as the trainer
reported; ``auto`` without a SASRec model beside the tables trains and ranks HeLLM alone."""
from __future__ import annotations

import json

import pytest

from hellm_ds.train.finetune import ADAPTER_CONFIG, FUSION_WEIGHTS
from tests.train.common import log, run


@pytest.fixture(scope="module")
def sasrec_tables(tables, tmp_path_factory):
    """(data dir, graph table, the sequential table of a SASRec trained here — its model beside it)."""
    from hellm_ds.data.dataset import load_dataset
    from hellm_ds.pretrain.train_sasrec import EXPORT_NAME, SASRecTrainConfig, train_sasrec

    data, graph, _ = tables
    out = tmp_path_factory.mktemp("sasrec")
    train_sasrec(load_dataset(data), SASRecTrainConfig(epochs=3, dim=16, n_heads=1, num_threads=1), out,
                 progress=False)
    return data, graph, out / EXPORT_NAME


def test_fusion_picks_the_weight_on_validation_and_reloads_the_same(sasrec_tables, tmp_path):
    from hellm_ds.eval.checkpoint import evaluate_checkpoint
    from hellm_ds.exports import load_run_dataset

    out = tmp_path / "run"
    run(sasrec_tables, out, "--epochs", "2", "--steps-per-epoch", "10", "--lr", "3e-3", "--fusion", "sasrec")
    fusion = [r for r in log(out) if r["event"] == "fusion"]
    assert len(fusion) == 2
    for rec in fusion:  # each validation ranked every weight and kept the best (ties: the smaller weight)
        scores = {float(w): s for w, s in rec["weights"].items()}
        assert sorted(scores) == sorted(FUSION_WEIGHTS)
        assert rec["chosen"] == max(scores, key=lambda w: (scores[w], -w))
    res = json.loads((out / "results.json").read_text())
    best = fusion[res["best_epoch"] - 1]
    assert res["fusion_weight"] == best["chosen"]
    assert res["valid"]["paper"]["NDCG@10"] == pytest.approx(best["weights"][str(best["chosen"])], abs=1e-12)
    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    assert meta["fusion"]["weight"] == res["fusion_weight"]
    assert meta["fusion"]["sasrec_model"].endswith("sasrec_model.safetensors")
    dataset, _ = load_run_dataset(out, sasrec_tables[0])
    again = evaluate_checkpoint(out, dataset)
    for proto in ("paper", "filtered"):
        for k, v in res["test"][proto].items():
            assert again["test"][proto][k] == pytest.approx(v, abs=1e-6), (proto, k)


def test_auto_without_a_sasrec_model_ranks_hellm_alone(tables, tmp_path):
    out = tmp_path / "run"
    run(tables, out, "--epochs", "1", "--steps-per-epoch", "3")
    assert not [r for r in log(out) if r["event"] == "fusion"]
    assert "fusion_weight" not in json.loads((out / "results.json").read_text())
    assert "fusion" not in json.loads((out / ADAPTER_CONFIG).read_text())
    start = [r for r in log(out) if r["event"] == "start"][0]
    assert start["config"]["fusion"] == "none"
