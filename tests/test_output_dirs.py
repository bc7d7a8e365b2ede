"""A failed command leaves no empty output directory behind, and values it clamps are said once on stderr."""
from __future__ import annotations

import os
import sys

import pytest

from hellm_ds.cli import main
from hellm_ds.utils.io import removed_if_left_empty
from tests.train.common import run_group


def test_removed_if_left_empty(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with removed_if_left_empty(out):
            (out / "c").mkdir(parents=True)
            raise RuntimeError
    assert not (tmp_path / "a").exists()  # every folder the command created, not only --out itself
    with pytest.raises(RuntimeError):
        with removed_if_left_empty(out):
            out.mkdir(parents=True)
            (out / "log.jsonl").write_text("{}\n")
            raise RuntimeError
    assert (out / "log.jsonl").is_file()  # something was written: kept
    empty = tmp_path / "mine"
    empty.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with removed_if_left_empty(empty):
            raise KeyboardInterrupt
    assert empty.is_dir()  # it was there before: never removed
    with removed_if_left_empty(tmp_path / "ok"):
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()  # success: untouched


@pytest.fixture
def bad_data(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "sequences.txt").write_text("1 4 5 6\n2 7 x8 9\n")
    return d


@pytest.mark.parametrize("argv", [
    ["build-graphs", "--data", "{bad}"],
    ["pretrain-graph", "--data", "{bad}"],
    ["pretrain-seq", "--data", "{bad}"],
    ["pipeline", "--data", "{bad}"],
    ["pretrain-graph", "--data", "{good}", "--knn-k", "0"],  # fails after pretrain-graph made --out
])
def test_failed_commands_leave_no_output_directory(argv, bad_data, synth_dir, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    argv = [a.format(bad=bad_data, good=synth_dir) for a in argv] + ["--out", str(out)]
    assert main(argv) == 2
    assert "hellm-ds: error:" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_failed_finetune_leaves_no_output_directory(tables, tmp_path):
    data, graph, seq = tables
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    out = tmp_path / "new" / "ft"
    p = run_group([sys.executable, "-m", "hellm_ds", "finetune", "--data", str(data), "--graph-emb",
                   str(tmp_path / "absent.safetensors"), "--seq-emb", str(seq), "--out", str(out),
                   "--no-progress"], env=env, timeout=300)
    assert p.returncode == 2 and "absent.safetensors" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "new").exists()


def test_clamped_knn_k_is_noted_once(synth_dir, tmp_path, capsys):
    assert main(["build-graphs", "--data", str(synth_dir), "--out", str(tmp_path / "g"), "--knn-k", "100000",
                 "--modalities", "image,text", "--no-exact"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "--knn-k 100000" in notes[0] and "150 items" in notes[0], notes
    assert main(["build-graphs", "--data", str(synth_dir), "--out", str(tmp_path / "g2"), "--knn-k", "5",
                 "--no-exact"]) == 0
    assert "note:" not in capsys.readouterr().err
