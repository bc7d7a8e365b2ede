"""SASRec (stage 1b): model invariants, the objective, training/selection, exports, resume, CLI.

Runs on 1 CPU thread (``num_threads=1``): bit-exact resume needs a fixed thread count, and on a shared
2-core machine one thread is also the fast choice.
"""
import argparse
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hellm_ds.baselines.popularity import evaluate_popularity
from hellm_ds.data.batching import NextItemExamples
from hellm_ds.data.dataset import load_dataset
from hellm_ds.data.synth import SynthConfig, write_synthetic
from hellm_ds.errors import UsageError
from hellm_ds.eval.evaluator import evaluate
from hellm_ds.pretrain.sasrec import SASRec, full_softmax_ce
from hellm_ds.pretrain.train_sasrec import (
    CHECKPOINT_NAME,
    EXPORT_NAME,
    MODEL_NAME,
    SASRecTrainConfig,
    _sequence_loss,
    _TrainSequences,
    add_cli,
    load_sasrec,
    train_sasrec,
)
from hellm_ds.utils.checkpoint import load_tensors, read_metadata
from hellm_ds.utils.runlog import read_log

FAST = dict(batch_size=32, lr=5e-3, num_threads=1, eval_batch_size=256)


@pytest.fixture(scope="module")
def synth(synth_dir):
    return load_dataset(synth_dir)


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("sasrec") / "run"
    cfg = SASRecTrainConfig(epochs=6, **FAST)
    return out, cfg, train_sasrec(synth, cfg, out, progress=False)


def _losses(out):
    return [r["loss"] for r in read_log(out / "log.jsonl") if r["event"] == "epoch"]


# ---- the model ---------------------------------------------------------------------------------------------
def _model(n_items=40, **kw):
    torch.manual_seed(0)
    m = SASRec(n_items, dim=16, n_blocks=2, n_heads=2, max_len=12, dropout=0.3, **kw)
    with torch.no_grad():  # positions start at zero; give them values so the test sees them
        m.pos_emb.weight.normal_()
    return m.eval()


def test_causal_mask_later_items_do_not_change_earlier_states():
    m = _model()
    x = torch.tensor([[0, 0, 5, 7, 9, 11, 3, 2]])
    y = x.clone()
    y[0, 5:] = torch.tensor([30, 31, 32])
    hx, hy = m(x), m(y)
    assert torch.equal(hx[:, :5], hy[:, :5])
    assert not torch.allclose(hx[:, 5:], hy[:, 5:])


def test_left_padding_does_not_change_user_vectors():
    m = _model()
    seq = torch.tensor([4, 8, 15, 16, 23])
    short = seq[None]
    long = torch.cat([torch.zeros(1, 6, dtype=torch.long), short], 1)
    batch = torch.stack([long[0], torch.cat([torch.zeros(7, dtype=torch.long), torch.tensor([1, 2, 3, 4])])])
    u_short = m.user_vectors({"input_ids": short})
    u_long = m.user_vectors({"input_ids": long})
    u_batch = m.user_vectors({"input_ids": batch})[:1]
    torch.testing.assert_close(u_long, u_short, atol=1e-6, rtol=0)
    torch.testing.assert_close(u_batch, u_short, atol=1e-6, rtol=0)
    # every real position, not only the last, equals the same position of the unpadded sequence
    torch.testing.assert_close(m(long)[:, 6:], m(short), atol=1e-6, rtol=0)


def test_padding_rows_are_finite_and_zero_including_gradients():
    m = _model().train()
    x = torch.tensor([[0, 0, 0, 1, 2], [0, 0, 0, 0, 3]])
    h = m(x)
    assert torch.isfinite(h).all() and (h[x == 0] == 0).all()
    h.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert (m.item_emb.weight.grad[0] == 0).all()


def test_longer_inputs_keep_the_last_max_len_columns():
    m = _model()
    x = torch.arange(1, 16)[None]  # 15 items > max_len 12
    torch.testing.assert_close(m(x), m(x[:, -12:]))


def test_full_softmax_ce_matches_autograd():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 6, dtype=torch.float64, generator=g, requires_grad=True)
    E = torch.randn(13, 6, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 13, (9,), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: full_softmax_ce(a, b, t), (h, E))
    ref = F.cross_entropy(h @ E.T, t)
    got = full_softmax_ce(h, E, t)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.autograd.grad(got, (h, E)), torch.autograd.grad(ref, (h, E)))


def test_sequence_loss_is_the_every_prefix_objective(synth):
    """One pass over whole training parts = mean CE of every (prefix → next item) in Dataset.train_samples."""
    torch.manual_seed(0)
    m = SASRec(synth.n_items, dim=16, n_blocks=2, n_heads=1, max_len=50, dropout=0.0).eval()
    with torch.no_grad():
        m.pos_emb.weight.normal_(std=0.3)
    data = _TrainSequences(synth)
    assert data.n_targets == len(synth.train_samples)
    with torch.no_grad():
        seq_loss, n = _sequence_loss(m, *data.batch(np.arange(len(data))))
        ex = NextItemExamples(synth, "train")
        b = ex.collate(np.arange(len(ex)))
        logits = m.user_vectors(b) @ m.item_embeddings()[1:].T
        prefix_loss = F.cross_entropy(logits, b["targets"] - 1)
    assert n == len(ex)
    torch.testing.assert_close(seq_loss, prefix_loss, atol=1e-5, rtol=1e-5)


# ---- training ----------------------------------------------------------------------------------------------
def test_beats_popularity_on_synthetic(synth, trained):
    _, _, res = trained
    pop = evaluate_popularity(synth, progress=False)
    for proto in ("paper", "filtered"):
        assert res["test"][proto]["NDCG@10"] >= 1.5 * pop["test"][proto]["NDCG@10"], proto
        assert res["test"][proto]["Recall@10"] >= 1.5 * pop["test"][proto]["Recall@10"], proto
    assert set(res["valid"]) == set(res["test"]) == {"paper", "filtered"}
    assert 1 <= res["best_epoch"] <= res["epochs_run"] == 6
    assert res["seconds"] > 0 and res["seconds_per_epoch"] > 0


def test_selection_is_on_validation_and_logged(trained):
    out, cfg, res = trained
    epochs = [r for r in read_log(out / "log.jsonl") if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(1, 7))
    valid = [r["valid"]["paper"]["NDCG@10"] for r in epochs]
    assert res["best_epoch"] == 1 + int(np.argmax(valid))
    assert res["valid"] == epochs[res["best_epoch"] - 1]["valid"]
    assert all(np.isfinite(r["loss"]) and r["seconds"] > 0 for r in epochs)


def test_export_round_trip(synth, trained):
    out, cfg, res = trained
    tensors, meta = load_tensors(out / EXPORT_NAME, expect={"item": (synth.n_items + 1, cfg.dim)})
    model, model_meta = load_sasrec(out / MODEL_NAME)
    torch.testing.assert_close(tensors["item"], model.item_embeddings().detach(), rtol=0, atol=0)
    assert (tensors["item"][0] == 0).all()
    assert meta["dataset"] == synth.fingerprint and meta["best_epoch"] == res["best_epoch"]
    assert meta["config"]["dim"] == cfg.dim and meta["test"] == res["test"]
    # the exported model reproduces the reported test metrics (exactly, under the same batching and threads:
    # other paddings/blockings move scores in the last bit, which can flip near-ties)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        again = evaluate(synth, "test", model.user_vectors, item_vectors=model.item_embeddings(),
                         batch_size=cfg.eval_batch_size, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert again == res["test"]


def test_resume_replays_the_uninterrupted_trajectory(synth, tmp_path):
    cfg4 = SASRecTrainConfig(epochs=4, **FAST)
    full = train_sasrec(synth, cfg4, tmp_path / "full", progress=False)
    train_sasrec(synth, SASRecTrainConfig(epochs=2, **FAST), tmp_path / "half", progress=False)
    shutil.copytree(tmp_path / "half", tmp_path / "resumed")
    resumed = train_sasrec(synth, cfg4, tmp_path / "resumed", resume=True, progress=False)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "resumed")  # exact, not approx
    assert len(_losses(tmp_path / "resumed")) == 4
    assert resumed["epochs_run"] == 4 and resumed["test"] == full["test"]
    a, _ = load_tensors(tmp_path / "full" / EXPORT_NAME)
    b, _ = load_tensors(tmp_path / "resumed" / EXPORT_NAME)
    assert torch.equal(a["item"], b["item"])


def test_resume_guards(synth, trained, tmp_path):
    out, cfg, _ = trained
    with pytest.raises(UsageError, match="resume"):  # a fresh run must not clobber an existing one
        train_sasrec(synth, cfg, out, progress=False)
    shutil.copytree(out, tmp_path / "run")
    with pytest.raises(UsageError, match="hyper-parameters"):
        train_sasrec(synth, SASRecTrainConfig(epochs=7, **{**FAST, "lr": 1e-3}), tmp_path / "run",
                     resume=True, progress=False)
    with pytest.raises(UsageError, match="no checkpoint"):
        train_sasrec(synth, cfg, tmp_path / "empty", resume=True, progress=False)


def test_time_budget_stops_after_one_epoch_and_still_exports(synth, tmp_path):
    cfg = SASRecTrainConfig(epochs=50, time_budget=1e-3, **FAST)
    res = train_sasrec(synth, cfg, tmp_path, progress=False)
    assert res["epochs_run"] == 1 and res["best_epoch"] == 1 and res["stop_reason"] == "time_budget"
    assert (tmp_path / EXPORT_NAME).is_file() and (tmp_path / CHECKPOINT_NAME).is_file()


def test_budget_counts_across_resumes(synth, tmp_path):
    """A resume of a run that spent its budget trains nothing (a requeued job does not get a fresh budget);
    raising the budget trains on from the checkpoint."""
    cfg = SASRecTrainConfig(epochs=3, time_budget=1e-3, **FAST)
    train_sasrec(synth, cfg, tmp_path, progress=False)
    again = train_sasrec(synth, cfg, tmp_path, resume=True, progress=False)
    assert again["epochs_run"] == 1 and again["stop_reason"] == "time_budget"
    assert len(_losses(tmp_path)) == 1
    more = train_sasrec(synth, SASRecTrainConfig(epochs=3, time_budget=None, **FAST), tmp_path, resume=True,
                        progress=False)
    assert more["epochs_run"] == 3 and more["stop_reason"] == "epochs" and len(_losses(tmp_path)) == 3


def test_resume_refuses_the_graph_recipes_checkpoint(synth, tmp_path):
    from hellm_ds.pretrain.train_graph import GraphTrainConfig, train_graph

    train_graph(synth, GraphTrainConfig(epochs=1, batch_size=256), tmp_path, progress=False)
    with pytest.raises(UsageError, match="is a graph checkpoint: give each recipe its own --out"):
        train_sasrec(synth, SASRecTrainConfig(epochs=1, **FAST), tmp_path, resume=True, progress=False)


def test_refuses_to_overwrite_another_datasets_export(trained, tmp_path):
    out, cfg, _ = trained
    other_dir = write_synthetic(tmp_path / "other", SynthConfig(users=80, items=30, seed=3))
    other = load_dataset(other_dir)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(out / EXPORT_NAME, run / EXPORT_NAME)
    before = (run / EXPORT_NAME).read_bytes()
    with pytest.raises(UsageError, match="another dataset"):
        train_sasrec(other, SASRecTrainConfig(epochs=1, **FAST), run, progress=False)
    assert (run / EXPORT_NAME).read_bytes() == before
    assert not (run / CHECKPOINT_NAME).exists()  # refused before training started


def test_config_validation():
    with pytest.raises(UsageError, match="n_heads"):
        SASRecTrainConfig(dim=64, n_heads=3)
    with pytest.raises(UsageError, match="select_metric"):
        SASRecTrainConfig(select_metric="NDCG@7")
    with pytest.raises(UsageError, match="dropout"):
        SASRecTrainConfig(dropout=1.0)


def test_cli_subcommand(synth_dir, tmp_path):
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["pretrain-seq", "--data", str(synth_dir), "--out", str(tmp_path),
                              "--epochs", "2", "--dim", "32", "--heads", "2", "--batch-size", "64",
                              "--threads", "1", "--quiet"])
    res = args.func(args)
    json.dumps(res)  # the CLI prints it as JSON
    assert res["epochs_run"] == 2 and set(res["test"]) == {"paper", "filtered"}
    meta = read_metadata(tmp_path / EXPORT_NAME)
    assert (meta["config"]["dim"], meta["config"]["n_heads"], meta["config"]["batch_size"]) == (32, 2, 64)
