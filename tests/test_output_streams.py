"""Logs are for humans: every `hellm-ds` subcommand prints exactly one JSON object on stdout and its messages
on stderr; a stderr that is not a terminal gets plain lines (one per training epoch), never a progress bar's
carriage-return redraws; DeepSpeed's INFO logs and the FutureWarnings of its collectives only with --verbose.

The commands run as subprocesses with stderr on a pipe (bytes, so a '\\r' is not turned into a newline), on a
tiny synthetic dataset."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from hellm_ds.utils.progress import progress_bar, progress_line
from hellm_ds.utils.verbosity import launcher_line_shown
from tests.train.common import launcher_env, run_group

EPOCHS = 2
FINETUNE = ["--model", "tiny", "--prefix-len", "3", "--lora-r", "4", "--micro-batch-size", "8",
            "--max-len", "10", "--eval-batch-size", "200", "--trainable-scope", "full", "--item-head", "tied"]


def hellm(*args) -> tuple[dict, str]:
    """Run ``hellm-ds ARGS``; its stdout parsed as one JSON object, and its stderr."""
    p = run_group([sys.executable, "-m", "hellm_ds", *map(str, args)], env=launcher_env(), timeout=300)
    out, err = p.stdout, p.stderr
    assert p.returncode == 0, f"{args[0]}: exit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    res = json.loads(out)  # exactly one JSON value: anything printed before or after it fails here
    assert isinstance(res, dict), args[0]
    assert "\r" not in err, f"{args[0]} drew a progress bar into a pipe:\n{err[-2000:]!r}"
    return res, err


def epoch_lines(err: str, name: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{name} epoch ")]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> dict[str, Path]:
    """A tiny dataset (``synth``), and its graph and SASRec embeddings (``pretrain-graph``, ``pretrain-seq``,
    two epochs each): every command's output checked on the way."""
    d = tmp_path_factory.mktemp("streams")
    res, _ = hellm("synth", "--out", d / "data", "--users", 200, "--items", 60, "--seed", 3)
    assert res["users"] == 200
    res, err = hellm("pretrain-graph", "--data", d / "data", "--out", d / "graph", "--max-len", 10,
                     "--epochs", EPOCHS, "--eval-every", 1, "--batch-size", 256)
    assert res["epochs_run"] == EPOCHS
    assert len(epoch_lines(err, "graph")) == EPOCHS and len(err.splitlines()) <= 2 * EPOCHS + 2, err
    res, err = hellm("pretrain-seq", "--data", d / "data", "--out", d / "seq", "--max-len", 10,
                     "--epochs", EPOCHS, "--batch-size", 32)
    assert res["epochs_run"] == EPOCHS
    assert len(epoch_lines(err, "sasrec")) == EPOCHS and len(err.splitlines()) <= 2 * EPOCHS + 2, err
    return {"data": d / "data", "graph": d / "graph" / "graph_embeddings.safetensors",
            "seq": d / "seq" / "sequential_item_embeddings.safetensors", "root": d}


def test_quick_subcommands_print_one_json_object(stage1, tmp_path):
    data = stage1["data"]
    hellm("stats", "--data", data)
    _, err = hellm("baseline", "popularity", "--data", data)
    assert err == ""  # one bar per split on a terminal, nothing in a pipe
    hellm("build-graphs", "--data", data, "--out", tmp_path / "graphs", "--knn-k", 5)

    # one process, progress on: one line per epoch; no DeepSpeed FutureWarning (it came once per step)
    out = tmp_path / "ft"
    res, err = hellm("finetune", "--data", data, "--graph-emb", stage1["graph"], "--seq-emb", stage1["seq"],
                     "--out", out, *FINETUNE, "--epochs", EPOCHS, "--steps-per-epoch", 5)
    assert res["global_step"] == 5 * EPOCHS
    assert len(epoch_lines(err, "finetune")) == EPOCHS, err
    assert "FutureWarning" not in err and "[INFO]" not in err, err
    assert len(err.splitlines()) <= EPOCHS + 4, err

    _, err = hellm("evaluate", "--checkpoint", out, "--data", data)
    assert err == "", err
    res, _ = hellm("recommend", "--checkpoint", out, "--data", data, "--users", "1,2", "--k", 3)
    assert [r["user"] for r in res["users"]] == [1, 2]
    hellm("plot", "--run", out)


def test_finetune_verbose_shows_deepspeed_info_and_each_warning_once(stage1, tmp_path):
    """--verbose: DeepSpeed's INFO records, and each deprecated-collective FutureWarning once, not once per
    step (ZeRO-3 reduce-scatters gradients in every one of these 10 steps)."""
    res, err = hellm("finetune", "--data", stage1["data"], "--graph-emb", stage1["graph"], "--seq-emb",
                     stage1["seq"], "--out", tmp_path / "ft", *FINETUNE, "--epochs", 1,
                     "--steps-per-epoch", 10, "--skip-eval", "--no-progress", "--verbose")
    assert res["global_step"] == 10
    assert "[INFO]" in err
    warned = [line for line in err.splitlines() if "FutureWarning" in line]
    assert len(warned) == len(set(warned)) <= 2, warned  # all-gather and reduce-scatter, at most once each


def test_progress_bar_draws_on_a_terminal_only(monkeypatch, capsys):
    class Terminal:  # stderr as a terminal
        def __init__(self):
            self.text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    assert list(progress_bar(range(3), desc="x")) == [0, 1, 2]  # pytest's capture is no terminal
    progress_line("epoch 0: done")
    progress_line("not shown", enabled=False)
    assert capsys.readouterr() == ("", "epoch 0: done\n")
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    list(progress_bar(range(3), desc="x", ncols=60))
    assert "\r" in term.text and "x:" in term.text
    term.text = ""
    list(progress_bar(range(3), desc="x", ncols=60, enabled=False))
    assert term.text == ""


def test_launcher_lines_kept_from_the_terminal():
    chatter = [
        "[2026-12-04 02:52:03,390] [INFO] [launch.py:170:main] dist_world_size=2\n",
        "[2026-12-04 02:52:00,382] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile, will "
        "proceed with training with local resources only.\n",
        "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully\n",
        '{"best_epoch": 1, "valid": {}}\n',
    ]
    shown = ["finetune epoch 0: loss 4.0929 (3.2 s), valid paper/NDCG@10 0.0777\n",
             "[2026-12-04 02:52:42,455] [WARNING] [engine.py:1:x] something a user should see\n",
             "Traceback (most recent call last):\n", "error: non-finite loss (nan) at epoch 0\n"]
    assert not any(launcher_line_shown(line) for line in chatter)
    assert all(launcher_line_shown(line) for line in shown)
    assert all(launcher_line_shown(line, verbose=True) for line in chatter)
