"""hellm-ds plot: PNG training curves from the run logs of all three recipes (graph, SASRec, fine-tuning)."""
from __future__ import annotations

import json
import math
import shutil
import sys

import pytest

from hellm_ds.cli import main
from hellm_ds.data.dataset import load_dataset
from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.pretrain.mmhcl import MMHCLConfig
from hellm_ds.pretrain.train_graph import GraphTrainConfig, train_graph
from hellm_ds.pretrain.train_sasrec import SASRecTrainConfig, train_sasrec
from hellm_ds.utils import plot
from hellm_ds.utils.runlog import RunLog, read_log

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, width=None):
    """A real, non-blank PNG (signature, size, decodable, pixels that vary)."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, (path, len(data))
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 400
    if width is not None:
        assert img.shape[1] == width
    assert float(img[..., :3].std()) > 0.05  # not a blank canvas


def by_name(res: dict) -> dict:
    return {f["name"]: f for f in res["files"]}


def _metrics(base: float) -> dict:
    """The evaluator's shape: {protocol: {metric@k: value}}."""
    out = {}
    for proto, bump in (("paper", 0.0), ("filtered", 0.05)):
        out[proto] = {f"{m}@{k}": base + bump + 0.01 * k for m in ("Recall", "NDCG", "MRR") for k in (5, 10, 20)}
    return out


# ---- real stage-1 runs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph_run(synth_dir, tmp_path_factory):
    """2 epochs, then resumed to 3: the log holds start, epoch, epoch, result, resume, epoch, result."""
    out = tmp_path_factory.mktemp("plot_graph") / "run"
    ds = load_dataset(synth_dir)
    kw = {"model": MMHCLConfig(dim=16), "batch_size": 256, "eval_every": 1, "patience": 3, "device": "cpu",
          "backend": "torch"}
    train_graph(ds, GraphTrainConfig(epochs=2, **kw), out, progress=False)
    res = train_graph(ds, GraphTrainConfig(epochs=3, **kw), out, resume=True, progress=False)
    return out, res


@pytest.fixture(scope="module")
def sasrec_run(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plot_sasrec") / "run"
    ds = load_dataset(synth_dir)
    res = train_sasrec(ds, SASRecTrainConfig(dim=16, epochs=2, batch_size=128, device="cpu", num_threads=1),
                       out, progress=False)
    return out, res


def test_graph_run(graph_run):
    out, res = graph_run
    events = [r["event"] for r in read_log(out / "log.jsonl")]
    assert events == ["start", "epoch", "epoch", "result", "resume", "epoch", "result"]
    info = plot.plot_run(out)
    assert info["recipe"] == "graph" and info["resumes"] == 1
    assert info["out"] == str(out / "plots")
    files = by_name(info)
    assert set(files) == {"loss.png", "loss_terms.png", "metrics.png"}
    for f in files.values():
        assert f["path"].startswith(str(out / "plots")) and f["shows"]
        assert_png(out / "plots" / f["name"])
    assert_png(out / "plots" / "loss.png", width=700)
    assert files["loss.png"]["points"] == 3 and files["loss.png"]["x"] == [1, 3]
    assert "bpr" in files["loss_terms.png"]["shows"] and "cl_user" in files["loss_terms.png"]["shows"]
    assert "test at the best epoch" in files["metrics.png"]["shows"]
    assert info["best_epoch"] == res["best_epoch"]
    for proto in ("paper", "filtered"):
        for m in ("Recall@10", "NDCG@10"):
            assert info["test"][proto][m] == pytest.approx(res["test"][proto][m])
    json.dumps(info)  # JSON-able
    # no temporary files left behind, and a second call replaces the files in place
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(files)
    again = plot.plot_run(out)
    assert by_name(again).keys() == files.keys()
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(files)


def test_graph_run_curves(graph_run):
    out, res = graph_run
    run = plot.parse_run(out)
    epochs = [r for r in read_log(out / "log.jsonl") if r["event"] == "epoch"]
    assert run["x_label"] == "epoch"
    assert run["loss"] == [(r["epoch"], r["loss"]) for r in epochs]
    assert [x for x, _ in run["valid"]] == [1, 2, 3]
    assert run["valid"][1][1]["filtered"]["NDCG@10"] == epochs[1]["valid"]["filtered"]["NDCG@10"]
    assert run["test"][0] == res["best_epoch"]
    assert set(run["terms"]) == {"bpr", "reg", "cl_user", "cl_item"}


def test_sasrec_run(sasrec_run):
    out, res = sasrec_run
    info = plot.plot_run(out, out / "figs")
    assert info["recipe"] == "sasrec"
    files = by_name(info)
    assert set(files) == {"loss.png", "metrics.png"}  # no learning rate in SASRec's log, no loss terms
    for f in files.values():
        assert_png(out / "figs" / f["name"])
    run = plot.parse_run(out)
    assert [x for x, _ in run["loss"]] == [1, 2]  # every recipe counts epochs from 1
    assert run["test"][0] == res["best_epoch"]
    assert run["test"][1]["paper"]["NDCG@10"] == pytest.approx(res["test"]["paper"]["NDCG@10"])


# ---- fine-tuning log (the shared schema with per-step records, written through RunLog) ------------------------
def _finetune_segment(log: RunLog, steps, loss0, lr_of, evals, tests, resume_at=None, best=None):
    """4 steps per epoch; ``evals``/``tests``: step → metric base of the epoch ending there; ``best``: the
    result's best epoch (its test is the one logged at that epoch's end)."""
    if resume_at is not None:
        log.log("resume", step=resume_at, epoch=resume_at // 4, tag=f"step{resume_at}", step_in_epoch=0)
    else:
        log.log("start", step=0, recipe="finetune", world_size=1, zero_stage=2, steps_per_epoch=4,
                config={"lr": 1e-3}, model={"model": "tiny"})
    for s in steps:
        log.log("train", step=s, epoch=(s - 1) // 4 + 1, loss=loss0 - 0.1 * s, lr=lr_of(s - 1), next_lr=lr_of(s))
        if s in evals:
            ep = s // 4
            log.log("epoch", step=s, epoch=ep, loss=loss0, seconds=0.1, valid=_metrics(evals[s]))
            if s in tests:
                log.log("test", step=s, epoch=ep, metrics=_metrics(tests[s]))
            log.log("checkpoint", step=s, tag=f"step{s}-end")
    if best is not None:
        test = {s // 4: t for s, t in tests.items()}[best]
        log.log("result", step=steps[-1], best_epoch=best, test=_metrics(test), stop_reason="max_steps")


def lr_of(s: int) -> float:
    return 1e-3 * min(1.0, (s + 1) / 2) * (1 - s / 12)


@pytest.fixture()
def finetune_run(tmp_path):
    """Crashed after step 10 (checkpoint at step 8), resumed from step 8 with max_steps 10 ... the resumed part
    logs steps 9–10 again with other values; the first attempt's step 11 is stale and must go."""
    out = tmp_path / "ft"
    log = RunLog(out, tensorboard=False)
    _finetune_segment(log, range(1, 12), 5.0, lr_of, {4: 0.2, 8: 0.3}, {4: 0.25, 8: 0.35})
    log.log("train", step=11, epoch=2, loss="nan", lr=lr_of(10), next_lr=lr_of(11))  # non-finite, as logged
    log = RunLog(out, tensorboard=False)
    _finetune_segment(log, range(9, 11), 4.0, lr_of, {}, {8: 0.35}, resume_at=8, best=2)
    return out


def test_finetune_run(finetune_run):
    out = finetune_run
    run = plot.parse_run(out)
    assert run["recipe"] == "finetune" and run["x_label"] == "optimiser step" and run["resumes"] == 1
    steps = [s for s, _ in run["loss"]]
    assert steps == list(range(1, 11))  # unique, sorted; the stale step 11 dropped
    loss = dict(run["loss"])
    assert loss[8] == pytest.approx(5.0 - 0.8)  # before the resume point: first attempt
    assert loss[9] == pytest.approx(4.0 - 0.9) and loss[10] == pytest.approx(4.0 - 1.0)  # the resumed values
    assert dict(run["lr"])[3] == pytest.approx(lr_of(2))
    assert [s for s, _ in run["valid"]] == [4, 8]
    assert run["best_epoch"] == 2  # epochs from 1: steps 5–8
    x, m = run["test"]
    assert x == 8 and m["paper"]["Recall@10"] == pytest.approx(0.35 + 0.1)

    info = plot.plot_run(out)
    files = by_name(info)
    assert set(files) == {"loss.png", "lr.png", "metrics.png"}
    for f in files.values():
        assert_png(out / "plots" / f["name"])
    assert files["loss.png"]["points"] == 10 and "smoothed" in files["loss.png"]["shows"]
    assert "learning rate" in files["lr.png"]["shows"]
    assert info["test"]["filtered"]["NDCG@10"] == pytest.approx(0.35 + 0.05 + 0.1)
    assert set(info["test"]["paper"]) == {"Recall@10", "NDCG@10"}


def test_finetune_nonfinite_loss_is_a_gap(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)
    _finetune_segment(log, range(1, 4), 5.0, lr_of, {}, {})
    log.log("train", step=4, epoch=1, loss=float("nan"), lr=lr_of(3), next_lr=lr_of(4))
    run = plot.parse_run(tmp_path)
    assert math.isnan(dict(run["loss"])[4])
    info = plot.plot_run(tmp_path)
    assert any("non-finite" in n for n in info["notes"])
    assert_png(tmp_path / "plots" / "loss.png")


def test_finetune_fresh_restart_plots_the_last_run(tmp_path):
    """A fresh run (no --resume) starts a fresh log (RunLog(fresh=True), as every recipe opens it)."""
    log = RunLog(tmp_path, tensorboard=False, fresh=True)
    _finetune_segment(log, range(1, 9), 9.0, lr_of, {4: 0.1, 8: 0.1}, {4: 0.1}, best=1)
    log = RunLog(tmp_path, tensorboard=False, fresh=True)
    _finetune_segment(log, range(1, 5), 3.0, lr_of, {4: 0.4}, {4: 0.45}, best=1)
    run = plot.parse_run(tmp_path)
    assert run["loss"] == [(s, pytest.approx(3.0 - 0.1 * s)) for s in range(1, 5)]
    assert run["test"] == (4, run["test"][1]) and run["test"][1]["paper"]["Recall@10"] == pytest.approx(0.45 + 0.1)


def test_smooth():
    assert plot.smooth([2.0] * 50) == pytest.approx([2.0] * 50)  # bias-corrected: no ramp from zero
    assert plot.smooth([1.0, 5.0, 3.0], 0.0) == [1.0, 5.0, 3.0]
    out = plot.smooth([1.0, float("nan"), 1.0], 0.5)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == pytest.approx(1.0)
    noisy = [float(i % 2) for i in range(200)]
    assert max(plot.smooth(noisy)[100:]) - min(plot.smooth(noisy)[100:]) < 0.2
    with pytest.raises(UsageError):
        plot.smooth([1.0], 1.0)


# ---- bad input -------------------------------------------------------------------------------------------------
def test_garbled_line_names_the_line(graph_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(graph_run[0] / "log.jsonl", out / "log.jsonl")
    lines = (out / "log.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1][: len(lines[1]) // 2] + "\n"  # line 2 cut in half
    (out / "log.jsonl").write_text("".join(lines))
    with pytest.raises(DataFormatError) as e:
        plot.plot_run(out)
    assert e.value.line == 2 and e.value.path == str(out / "log.jsonl")
    assert f"{out / 'log.jsonl'}:2: log line is not valid JSON" in str(e.value)
    assert not (out / "plots").exists()


@pytest.mark.parametrize("line, line_no, message", [
    ('[1, 2]\n', 2, "not a JSON object"),
    ('{"time": 1.0, "step": 1}\n', 2, "no 'event'"),
    ('{"event": "epoch", "step": 1, "epoch": 2, "seconds": 0.1}\n', 2, "no 'loss'"),
    ('{"event": "epoch", "step": 1, "epoch": 2, "loss": "low"}\n', 2, "'loss' is not a number"),
    ('{"event": "epoch", "step": "one", "epoch": 2, "loss": 1.0}\n', 2, "no integer 'step'"),
    ('{"event": "epoch", "step": 1, "loss": 1.0}\n', 2, "no integer 'epoch'"),
    ('{"event": "epoch", "step": 1, "epoch": 2, "loss": 1.0, "valid": {"paper": 3}}\n', 2, "'valid.paper'"),
])
def test_bad_records_name_the_line(tmp_path, line, line_no, message):
    good = json.dumps({"event": "epoch", "step": 0, "epoch": 1, "loss": 1.0}) + "\n"
    (tmp_path / "log.jsonl").write_text(good + line + "\n")
    with pytest.raises(DataFormatError) as e:
        plot.parse_run(tmp_path)
    assert e.value.line == line_no and message in str(e.value)


def test_non_utf8_and_missing_log(tmp_path):
    with pytest.raises(DataFormatError) as e:
        plot.plot_run(tmp_path)
    assert e.value.line is None and e.value.path == str(tmp_path / "log.jsonl") and "not found" in str(e.value)
    (tmp_path / "log.jsonl").write_bytes(b'{"event": "epoch", "step": 0, "epoch": 1, "loss": 1.0}\n\xff\xfe\n')
    with pytest.raises(DataFormatError) as e:
        plot.plot_run(tmp_path)
    assert e.value.line == 2


def test_matplotlib_missing_is_a_usage_error(graph_run, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(UsageError, match=r"pip install matplotlib.*pip install -e \.\[plot\]"):
        plot.plot_run(graph_run[0], tmp_path / "figs")
    assert not (tmp_path / "figs").exists()


# ---- command line ----------------------------------------------------------------------------------------------
def test_cli_prints_json(graph_run, tmp_path, capsys):
    assert main(["plot", "--run", str(graph_run[0]), "--out", str(tmp_path / "figs")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["recipe"] == "graph"
    assert {f["name"] for f in res["files"]} == {"loss.png", "loss_terms.png", "metrics.png"}
    for f in res["files"]:
        assert f["path"] == str(tmp_path / "figs" / f["name"])
        assert_png(tmp_path / "figs" / f["name"])


def test_cli_bad_log_exits_2(tmp_path, capsys):
    (tmp_path / "log.jsonl").write_text('{"event": "start"}\n{"event": \n')
    assert main(["plot", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hellm-ds: error: ") and f"{tmp_path / 'log.jsonl'}:2:" in err
