"""Graph pre-training recipe: beats popularity on planted data, export round trip, exact resume."""
import json
import math
import shutil

import pytest
import torch

from hellm_ds.baselines.popularity import evaluate_popularity
from hellm_ds.data.dataset import load_dataset
from hellm_ds.errors import UsageError
from hellm_ds.pretrain.mmhcl import MMHCLConfig
from hellm_ds.pretrain.train_graph import EXPORT_NAME, GraphTrainConfig, train_graph
from hellm_ds.utils.checkpoint import load_tensors
from hellm_ds.utils.runlog import read_log

FAST = dict(batch_size=256, eval_every=5, patience=3)


@pytest.fixture(scope="module")
def trained(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("graph_run")
    ds = load_dataset(synth_dir)
    res = train_graph(ds, GraphTrainConfig(epochs=25, **FAST), out, progress=False)
    return ds, out, res


@pytest.mark.parametrize("protocol", ["paper", "filtered"])
def test_beats_popularity_clearly(trained, protocol):
    ds, _, res = trained
    pop = evaluate_popularity(ds, splits=("test",), progress=False)["test"][protocol]
    assert res["test"][protocol]["NDCG@10"] > 2 * pop["NDCG@10"]
    assert res["test"][protocol]["Recall@10"] > 1.5 * pop["Recall@10"]


def test_export_roundtrip_and_metadata(trained):
    ds, out, res = trained
    t, meta = load_tensors(out / EXPORT_NAME, {"user": (ds.n_users + 1, 64), "item": (ds.n_items + 1, 64)})
    assert (t["user"][0] == 0).all() and (t["item"][0] == 0).all()
    assert torch.equal(t["user_ids"], torch.from_numpy(ds.user_ids.copy()))
    assert meta["dataset"] == ds.fingerprint and meta["result"]["best_epoch"] == res["best_epoch"]
    # the exported vectors reproduce the reported test metrics through the shared evaluator
    from hellm_ds.eval.evaluator import evaluate

    again = evaluate(ds, "test", lambda b: t["user"][b["users"] + 1], item_vectors=t["item"], progress=False)
    assert again["paper"]["NDCG@10"] == pytest.approx(res["test"]["paper"]["NDCG@10"], abs=1e-6)
    log = read_log(out / "log.jsonl")
    assert [r["event"] for r in log][-1] == "result" and all("loss" in r for r in log if r["event"] == "epoch")
    # which sparse kernel ran and why, in the result, its log record and the export (CPU: torch CSR, unprobed)
    assert log[-1]["kernels"] == res["kernels"] == meta["result"]["kernels"]
    assert any(k["chosen"] == "torch" and k["mode"] == "default" and k["op"] == "spmm" for k in res["kernels"])


def test_resume_continues_the_same_trajectory(synth_dir, tmp_path):
    ds = load_dataset(synth_dir)
    cfg = GraphTrainConfig(model=MMHCLConfig(dim=16), epochs=4, **{**FAST, "eval_every": 2})
    train_graph(ds, cfg, tmp_path / "full", progress=False)
    train_graph(ds, GraphTrainConfig(**{**cfg.__dict__, "epochs": 2}), tmp_path / "part", progress=False)
    train_graph(ds, cfg, tmp_path / "part", resume=True, progress=False)
    losses = lambda d: [r["loss"] for r in read_log(d / "log.jsonl") if r["event"] == "epoch"]  # noqa: E731
    assert losses(tmp_path / "full") == losses(tmp_path / "part")
    a, _ = load_tensors(tmp_path / "full" / EXPORT_NAME)
    b, _ = load_tensors(tmp_path / "part" / EXPORT_NAME)
    assert torch.equal(a["user"], b["user"])


def test_resume_refuses_other_configuration(synth_dir, tmp_path):
    ds = load_dataset(synth_dir)
    train_graph(ds, GraphTrainConfig(model=MMHCLConfig(dim=8), epochs=1, **FAST), tmp_path, progress=False)
    with pytest.raises(UsageError, match=r"other hyper-parameters \(checkpoint, now\): .*'model'"):
        train_graph(ds, GraphTrainConfig(model=MMHCLConfig(dim=16), epochs=2, **FAST), tmp_path, resume=True)


def test_resume_after_a_stop_trains_no_further_epoch(synth_dir, tmp_path):
    """Early-stopped or out of budget: a resume re-tests and re-exports the best weights without training;
    a larger budget trains on. The budget counts across resumes."""
    ds = load_dataset(synth_dir)
    epochs = lambda d: [r["epoch"] for r in read_log(d / "log.jsonl") if r["event"] == "epoch"]  # noqa: E731
    cfg = GraphTrainConfig(model=MMHCLConfig(dim=8), epochs=30, **{**FAST, "eval_every": 1, "patience": 1})
    first = train_graph(ds, cfg, tmp_path / "es", progress=False)
    assert first["stop_reason"] == "early_stop" and first["epochs_run"] < 30
    again = train_graph(ds, cfg, tmp_path / "es", resume=True, progress=False)
    assert epochs(tmp_path / "es") == list(range(1, first["epochs_run"] + 1))
    assert again["test"] == first["test"] and again["stop_reason"] == "early_stop"

    cfg = GraphTrainConfig(model=MMHCLConfig(dim=8), epochs=3, time_budget=1e-3, **FAST)
    first = train_graph(ds, cfg, tmp_path / "tb", progress=False)
    assert first["stop_reason"] == "time_budget" and epochs(tmp_path / "tb") == [1]
    assert "valid" in read_log(tmp_path / "tb" / "log.jsonl")[-2]  # the budget's last epoch is validated
    train_graph(ds, cfg, tmp_path / "tb", resume=True, progress=False)
    assert epochs(tmp_path / "tb") == [1]
    more = train_graph(ds, GraphTrainConfig(**{**cfg.__dict__, "time_budget": None}), tmp_path / "tb",
                       resume=True, progress=False)
    assert more["stop_reason"] == "epochs" and epochs(tmp_path / "tb") == [1, 2, 3]


def test_resume_refuses_the_sasrec_recipes_checkpoint(synth_dir, tmp_path):
    from hellm_ds.pretrain.train_sasrec import SASRecTrainConfig, train_sasrec

    ds = load_dataset(synth_dir)
    train_sasrec(ds, SASRecTrainConfig(epochs=1, batch_size=256), tmp_path, progress=False)
    with pytest.raises(UsageError, match="is a sasrec checkpoint: give each recipe its own --out"):
        train_graph(ds, GraphTrainConfig(epochs=1, **FAST), tmp_path, resume=True, progress=False)


def test_export_refuses_another_datasets_output(synth_dir, tmp_path):
    ds = load_dataset(synth_dir)
    cfg = GraphTrainConfig(model=MMHCLConfig(dim=8), epochs=1, **FAST)
    train_graph(ds, cfg, tmp_path / "o", progress=False)
    other = tmp_path / "other"
    shutil.copytree(synth_dir, other)
    with open(other / "sequences.txt", "a") as f:
        f.write("99999 1 2 3\n")
    with pytest.raises(UsageError, match="another dataset"):
        train_graph(load_dataset(other), cfg, tmp_path / "o", progress=False)


def test_full_node_contrast_runs_and_differs(synth_dir, tmp_path):
    ds = load_dataset(synth_dir)
    res = {}
    for mode in ("full", "batch"):
        cfg = GraphTrainConfig(model=MMHCLConfig(dim=16, contrast=mode, contrast_block=100), epochs=1, **FAST)
        res[mode] = train_graph(ds, cfg, tmp_path / mode, progress=False)
    logs = {m: [r for r in read_log(tmp_path / m / "log.jsonl") if r["event"] == "epoch"][0] for m in res}
    assert logs["full"]["cl_user"] != logs["batch"]["cl_user"]
    # evaluates: both protocols' test metrics, finite rates in [0, 1], printable as strict JSON
    test = res["full"]["test"]
    assert set(test) == {"paper", "filtered"}
    for protocol in ("paper", "filtered"):
        for name in ("Recall@10", "NDCG@10", "Recall@20", "NDCG@20", "MRR@10"):
            value = test[protocol][name]
            assert math.isfinite(value) and 0.0 <= value <= 1.0, (protocol, name, value)
    assert json.loads(json.dumps(test, allow_nan=False)) == test
    # exports: the full-contrast run's own file, whose vectors reproduce the reported test metrics
    t, meta = load_tensors(tmp_path / "full" / EXPORT_NAME,
                           {"user": (ds.n_users + 1, 16), "item": (ds.n_items + 1, 16)})
    assert meta["config"]["model"]["contrast"] == "full" and meta["result"]["test"] == test
    from hellm_ds.eval.evaluator import evaluate

    again = evaluate(ds, "test", lambda b: t["user"][b["users"] + 1], item_vectors=t["item"], progress=False)
    for protocol in ("paper", "filtered"):
        assert again[protocol]["NDCG@10"] == pytest.approx(test[protocol]["NDCG@10"], abs=1e-6), protocol


def test_cli_pretrain_graph(synth_dir, tmp_path):
    from hellm_ds.cli import main

    assert main(["pretrain-graph", "--data", str(synth_dir), "--out", str(tmp_path), "--epochs", "2",
                 "--eval-every", "1", "--dim", "8", "--preset", "toys", "--quiet"]) == 0
    assert (tmp_path / EXPORT_NAME).is_file()
