"""Stage-2 DeepSpeed trainer on CPU (DS_ACCELERATOR=cpu, gloo): single process, two ranks through the
deepspeed launcher, resume, export → reload, ZeRO-2 vs ZeRO-3.

Runs go through ``tests.train.common.run`` (subprocesses, OMP_NUM_THREADS=1)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from hellm_ds.train.finetune import ADAPTER_CONFIG, ADAPTER_NAME, CKPT_DIR, FinetuneConfig, lr_at
from tests.train.common import ROOT, ZERO2, ZERO3, log, losses, run


def test_lr_schedule():
    lrs = [lr_at(s, 3e-4, 5e-6, 10, 30) for s in range(30)]
    assert lrs[0] == pytest.approx(3e-5) and lrs[9] == pytest.approx(3e-4)
    assert lrs[10] == pytest.approx(3e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(30, 3e-4, 5e-6, 10, 30) == pytest.approx(5e-6)
    assert lr_at(20, 3e-4, 5e-6, 10, 30) == pytest.approx((3e-4 + 5e-6) / 2)


def test_config_and_cli():
    from hellm_ds.errors import UsageError
    from hellm_ds.train.finetune import config_from_args

    cfg = config_from_args(["--data", "d", "--graph-emb", "g", "--seq-emb", "s", "--out", "o",
                            "--local_rank=1",
                            "--epochs", "3", "--resume", "--deepspeed_config", "ds_configs/zero2.json"])
    assert cfg.epochs == 3 and cfg.resume and cfg.deepspeed_config == "ds_configs/zero2.json"
    assert cfg.hellm_config().lora_r == 16
    with pytest.raises(UsageError):
        FinetuneConfig("d", "g", "s", "o", min_lr=1.0, lr=0.1)


def test_single_process_zero3_end_to_end_export_reload(tables, tmp_path):
    """Plain `python launch/finetune.py` (a world of one), ZeRO-3: trains, validates, tests at the best
    epoch, checkpoints, exports; the export reloads in this (non-DeepSpeed) process and scores the same."""
    from hellm_ds.data.dataset import load_dataset
    from hellm_ds.eval.evaluator import evaluate
    from hellm_ds.train import load_adapter

    out = tmp_path / "run"
    run(tables, out, "--epochs", "2", "--steps-per-epoch", "6", "--save-every", "4")
    res = json.loads((out / "results.json").read_text())
    assert res["zero_stage"] == 3 and res["world_size"] == 1 and res["global_step"] == 12
    assert res["best_epoch"] in (1, 2) and res["test"] is not None
    ev = log(out)
    train = [r for r in ev if r["event"] == "train"]
    assert len(train) == 12 and all(math.isfinite(r["loss"]) for r in train)
    # METHOD §5 schedule: warm-up over the first epoch (6 steps), then half-cosine to 5e-6
    assert [r["lr"] for r in train] == pytest.approx([lr_at(s, 3e-4, 5e-6, 6, 12) for s in range(12)])
    assert [r["epoch"] for r in ev if r["event"] == "epoch" and "valid" in r] == [1, 2]  # epochs from 1
    assert [r["event"] for r in ev][-1] == "result" and res["stop_reason"] == "epochs"
    ck = out / CKPT_DIR
    tag = (ck / "latest").read_text().strip()
    assert tag == "step12-end" and (ck / tag).is_dir()
    assert not any(p.name.startswith(".latest") for p in ck.iterdir())  # no temporary pointer left
    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    assert meta["epoch"] == res["best_epoch"] and (out / ADAPTER_NAME).is_file()
    # the config-built backbone's "auto" scope and head, resolved (never "auto") in the log and the export
    start = [r for r in ev if r["event"] == "start"][0]
    for rec in (start["config"], start["model"], meta["model"]):
        assert (rec["trainable_scope"], rec["item_head"]) == ("full", "tied"), rec
    assert meta["base"] is None  # scope full: the trained backbone is in the adapter export

    from hellm_ds.utils.plot import parse_run

    curves = parse_run(out)  # the shared log schema, read by plot
    assert [x for x, _ in curves["valid"]] == [6, 12] and curves["best_epoch"] == res["best_epoch"]
    model = load_adapter(out)  # one plain process, no DeepSpeed engine
    ds = load_dataset(tables[0], max_len=10)
    with torch.no_grad():
        W, b = model.item_scoring()
        valid = evaluate(ds, "valid", model.user_vectors, item_vectors=W, item_bias=b, batch_size=200,
                         progress=False)
    for proto in ("paper", "filtered"):
        for k, v in res["valid"][proto].items():
            assert valid[proto][k] == pytest.approx(v, abs=1e-9), (proto, k)


def test_two_ranks_deepspeed_launcher_partitioning(tables, tmp_path, cold_torch_extensions):
    """`deepspeed --num_gpus 2` with DS_ACCELERATOR=cpu: two gloo ranks; every base parameter is partitioned
    from construction on, each rank holds half of it, and none is visible outside forward. Nothing is
    JIT-compiled on the way (DeepSpeed's CPU backend would build its inference-only shm op: minutes on a
    fresh machine)."""
    out = tmp_path / "run"
    run(tables, out, "--epochs", "1", "--steps-per-epoch", "4", "--report-partitioning", ranks=2)
    built = sorted(p.name for p in cold_torch_extensions.iterdir())
    assert not built, f"JIT-compiled torch extensions: {built}"
    reps = [json.loads((out / "partitioning" / f"rank{r}.json").read_text()) for r in (0, 1)]
    n_base = 0
    for rep in reps:
        assert rep["world_size"] == 2 and rep["zero_stage"] == 3
        base = [p for p in rep["params"] if p["name"].startswith("backbone.") and ".lora_" not in p["name"]]
        n_base = len(base)
        assert rep["constructed_partitioned"] == n_base  # partitioned by zero.Init, not later
        for p in rep["params"]:
            assert p["partitioned"] and p["visible_numel"] == 0, p
            assert p["partition_numel"] == math.ceil(p["numel"] / 2), p
        assert rep["total_partition_numel"] <= rep["total_numel"] / 2 + len(rep["params"])
    assert n_base > 0
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["global_step"] == 4


def test_resume_same_losses(tables, tmp_path):
    """Interrupted after 5 steps (checkpoint), resumed: steps 6..12 (crossing an epoch boundary) give the
    uninterrupted run's losses (tolerance 1e-5 relative: same data order, same dropout seeds)."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ("--epochs", "2", "--steps-per-epoch", "6", "--skip-eval", "--lr", "1e-3")
    run(tables, full, *args)
    run(tables, part, *args, "--max-steps", "5")
    assert (part / CKPT_DIR / "latest").read_text().strip() == "step5"
    # the interrupted run logged exactly steps 1..5, each a real loss (finite, positive) and the uninterrupted
    # run's own (the same trajectory up to the checkpoint)
    first = losses(part)
    assert sorted(first) == [1, 2, 3, 4, 5], first
    assert all(math.isfinite(v) and v > 0 for v in first.values()), first
    for s in first:
        assert first[s] == pytest.approx(losses(full)[s], rel=1e-5), (s, first[s], losses(full)[s])
    run(tables, part, *args, "--resume")
    a, b = losses(full), losses(part)
    assert sorted(b) == list(range(1, 13))
    for s in range(1, 13):
        assert b[s] == pytest.approx(a[s], rel=1e-5), (s, a[s], b[s])
    assert any(r["event"] == "resume" for r in log(part))
    # resuming the finished run changes nothing; a fresh run into its directory is refused
    done = (part / "results.json").read_bytes()
    run(tables, part, *args, "--resume")
    assert (part / "results.json").read_bytes() == done and len(losses(part)) == 12
    p = run(tables, part, *args, check=False)
    assert p.returncode == 2 and "pass --resume" in p.stdout, p.stdout[-2000:]


def test_resume_after_max_steps_on_an_epoch_end(tables, tmp_path):
    """Stopped by --max-steps on an epoch's last step: that epoch is validated, tested and exported before the
    stop and checkpointed as an epoch end; the resume trains the next epoch under a tag of its own."""
    out = tmp_path / "run"
    args = ("--epochs", "2", "--steps-per-epoch", "3", "--lr", "1e-3")
    run(tables, out, *args, "--max-steps", "3")
    assert (out / CKPT_DIR / "latest").read_text().strip() == "step3-end"
    partial = json.loads((out / "partial_results.json").read_text())
    assert partial["stop_reason"] == "max_steps" and partial["best_epoch"] == 1 and partial["test"] is not None
    assert (out / ADAPTER_NAME).is_file()
    run(tables, out, *args, "--resume")
    tags = [r["tag"] for r in log(out) if r["event"] == "checkpoint"]
    assert tags == ["step3-end", "step6-end"], tags
    assert sorted(losses(out)) == list(range(1, 7))
    assert [r["epoch"] for r in log(out) if r["event"] == "epoch" and "valid" in r] == [1, 2]
    (out / CKPT_DIR / "latest").write_text("step99")  # a pointer to nothing is an error, not a fresh start
    p = run(tables, out, *args, "--resume", check=False)
    assert p.returncode == 2 and "step99" in p.stdout, p.stdout[-2000:]


def test_resume_refuses_changed_settings_naming_each(tables, tmp_path):
    """A resume with another learning rate, batch size or head is refused before anything is built, naming
    every difference (checkpoint, now); settings that do not change the trajectory (epochs) may change."""
    out = tmp_path / "run"
    args = ("--epochs", "1", "--steps-per-epoch", "2", "--skip-eval")
    run(tables, out, *args, "--lr", "1e-3")
    p = run(tables, out, *args, "--lr", "2e-3", "--micro-batch-size", "4", "--resume", check=False)
    assert p.returncode == 2, p.stdout[-2000:]
    assert "'lr': (0.001, 0.002)" in p.stdout and "'micro_batch_size': (8, 4)" in p.stdout, p.stdout[-2000:]
    assert "partitioning" not in p.stdout  # refused before the engine was built
    run(tables, out, "--epochs", "2", "--steps-per-epoch", "2", "--skip-eval", "--lr", "1e-3", "--resume")
    assert sorted(losses(out)) == [1, 2, 3, 4]


def test_two_ranks_resume_same_losses_across_launchers(tables, tmp_path):
    """Two ranks, ZeRO-3: uninterrupted (deepspeed launcher) vs interrupted after 2 steps (torchrun) and
    resumed (deepspeed launcher): steps 3..6 — across an epoch boundary — agree to 1e-5 relative."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ("--epochs", "2", "--steps-per-epoch", "3", "--skip-eval", "--lr", "1e-3")
    run(tables, full, *args, ranks=2)
    run(tables, part, *args, "--max-steps", "2", ranks=2, launcher="torchrun")
    assert (part / CKPT_DIR / "latest").read_text().strip() == "step2"
    run(tables, part, *args, "--resume", ranks=2)
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), (s, a[s], b[s])


def test_gradient_checkpointing_same_losses(tables, tmp_path):
    """The gradient-checkpointing switch changes memory, not the numbers (the prefix survives replay)."""
    args = ("--epochs", "1", "--steps-per-epoch", "4", "--skip-eval", "--lr", "1e-3")
    run(tables, tmp_path / "plain", *args)
    run(tables, tmp_path / "gc", *args, "--gradient-checkpointing")
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "gc")
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), (s, a[s], b[s])


def test_zero3_offload_config_same_losses(tables, tmp_path):
    """ds_configs/zero3_offload.json (parameters and optimiser state offloaded to CPU memory) trains the same
    trajectory as zero3.json (fp32 on CPU: 1e-5 relative). With the torch AdamW fall-back: the default
    DeepSpeedCPUAdam (a JIT-built op) is tested in tests/train/test_offload.py, whose cache is its own."""
    args = ("--epochs", "1", "--steps-per-epoch", "4", "--skip-eval", "--lr", "1e-3")
    run(tables, tmp_path / "z3", *args)
    run(tables, tmp_path / "off", *args, "--offload-optimizer", "torch",
        config=ROOT / "ds_configs" / "zero3_offload.json")
    a, b = losses(tmp_path / "z3"), losses(tmp_path / "off")
    assert len(a) == 4
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-5), (s, a[s], b[s])
    start = [r for r in log(tmp_path / "off") if r["event"] == "start"][0]
    assert start["zero_stage"] == 3 and start["optimizer"] == "AdamW"


def test_zero2_matches_zero3_local_checkpoint(tables, local_llama, tmp_path):
    """A local checkpoint directory: ZeRO-3 loads it partitioned (HfDeepSpeedConfig before from_pretrained),
    and ZeRO-2 and ZeRO-3 follow the same loss curve (fp32, 1e-4 relative). (A config-built random backbone
    is initialised differently inside zero.Init, so the two stages start from different random bases.)"""
    args = ("--epochs", "1", "--steps-per-epoch", "8", "--skip-eval", "--lr", "1e-3", "--model", local_llama)
    run(tables, tmp_path / "z2", *args, config=ZERO2)
    run(tables, tmp_path / "z3", *args, "--report-partitioning", config=ZERO3)
    a, b = losses(tmp_path / "z2"), losses(tmp_path / "z3")
    assert len(a) == 8
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-4), (s, a[s], b[s])
    rep = json.loads((tmp_path / "z3" / "partitioning" / "rank0.json").read_text())
    base = [p for p in rep["params"] if p["name"].startswith("backbone.") and ".lora_" not in p["name"]]
    assert rep["constructed_partitioned"] == len(base) > 0


def test_nonfinite_loss_stops_before_checkpoint(tables, tmp_path):
    """An absurd learning rate blows the weights up: the run stops naming the step, exit code 3, and the
    last checkpoint is the step before."""
    out = tmp_path / "run"
    p = run(tables, out, "--epochs", "1", "--steps-per-epoch", "6", "--skip-eval", "--lr", "1e30",
            "--min-lr", "1e29", "--warmup-epochs", "0", "--save-every", "1", check=False)
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-3000:]
    msg = [line for line in p.stdout.splitlines() if line.startswith("error: non-finite loss")]
    assert msg, p.stdout[-2000:]
    step = int(msg[0].split("optimiser step ")[1].split()[0])
    assert (out / CKPT_DIR / "latest").read_text().strip() == f"step{step - 1}"
    assert not (out / CKPT_DIR / f"step{step}").exists()


@pytest.mark.parametrize("objective", ["all", "last"])
def test_loss_falls(tables, tmp_path, objective):
    """A few dozen steps on the synthetic data, with the per-position objective (every history position
    predicts its next item; one sample per user) and with METHOD's (one prefix → its next item per sample,
    the instruction prompt): the last 10 steps' mean loss is clearly below the first 10 steps'."""
    out = tmp_path / "run"
    prompt = "items" if objective == "all" else "method"
    run(tables, out, "--epochs", "2", "--steps-per-epoch", "25", "--skip-eval", "--lr", "3e-3",
        "--warmup-epochs", "0.2", "--micro-batch-size", "16", "--objective", objective, "--prompt", prompt,
        config=ZERO2)
    start = [r for r in log(out) if r["event"] == "start"][0]
    assert (start["config"]["objective"], start["model"]["prompt"]) == (objective, prompt)
    assert start["model"]["prefix_queries"] == ("last" if objective == "all" else "all")
    ls = [losses(out)[s] for s in range(1, 51)]
    first, last = sum(ls[:10]) / 10, sum(ls[-10:]) / 10
    assert last < first - 0.1, (first, last)


def test_tied_head_full_scope_beats_popularity(tables, tmp_path):
    """A tiny backbone trained (scope full, tied item head) through ZeRO-3 on the synthetic data beats the
    popularity baseline's validation NDCG@10 and Recall@10 (the planted item successors are learnable even
    from random stage-1 tables: the projector gives each item its own token)."""
    from hellm_ds.baselines.popularity import evaluate_popularity
    from hellm_ds.data.dataset import load_dataset

    out = tmp_path / "run"
    # the default objective for a size name: per position, one sample per user (600 users: 37 steps/epoch)
    run(tables, out, "--epochs", "6", "--micro-batch-size", "16", "--lr", "3e-3", "--warmup-epochs", "0.5",
        "--item-head", "tied", "--trainable-scope", "full")
    res = json.loads((out / "results.json").read_text())
    pop = evaluate_popularity(load_dataset(tables[0], max_len=10), progress=False)
    for metric in ("NDCG@10", "Recall@10"):
        assert res["valid"]["paper"][metric] > 1.2 * pop["valid"]["paper"][metric], (metric, res["valid"], pop)
