"""`hellm-ds evaluate` on a tiny exported fine-tuning run (one ZeRO-3 process, 3 steps) and `hellm-ds finetune`:
the reloaded export scores what the run recorded; another dataset, another max_len and damaged exports are
refused with exit status 2 and one line on stderr (no traceback)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hellm_ds.cli import main
from hellm_ds.exports import ADAPTER_CONFIG, ADAPTER_NAME, RESULTS_NAME
from tests.train.common import run


@pytest.fixture(scope="module")
def trained(tables, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evalrun") / "out"
    run(tables, out, "--epochs", "1", "--steps-per-epoch", "3")
    assert (out / ADAPTER_NAME).is_file() and (out / RESULTS_NAME).is_file()
    return out


def _cli(capsys, *args):
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_evaluate_matches_recorded_results(trained, tables, capsys):
    data = tables[0]
    rc, out, err = _cli(capsys, "evaluate", "--checkpoint", trained, "--data", data, "--quiet",
                        "--batch-size", 64, "--device", "cpu")
    assert rc == 0, err
    got = json.loads(out)
    want = json.loads((trained / RESULTS_NAME).read_text())
    assert set(got) == {"valid", "test", "ties"} and got["ties"] == want["ties"] == "expected"
    for split in ("valid", "test"):
        assert set(got[split]) == set(want[split]) == {"paper", "filtered"}
        for proto, metrics in want[split].items():
            assert set(got[split][proto]) == set(metrics)
            for k, v in metrics.items():
                assert got[split][proto][k] == pytest.approx(v, abs=1e-6), (split, proto, k)
    rc, out, err = _cli(capsys, "evaluate", "--checkpoint", trained, "--data", data, "--quiet",
                        "--splits", "test", "--max-len", 10)
    assert rc == 0, err
    only = json.loads(out)
    assert set(only) == {"test", "ties"}
    assert only["test"]["paper"]["NDCG@10"] == pytest.approx(got["test"]["paper"]["NDCG@10"], abs=1e-6)
    rc, out, err = _cli(capsys, "evaluate", "--checkpoint", trained, "--data", data, "--quiet",
                        "--splits", "test", "--ties", "optimistic")
    assert rc == 0, err
    assert json.loads(out)["ties"] == "optimistic"


def test_evaluate_per_user_file_and_raw_ids(trained, tables, tmp_path, capsys):
    """``--per-user``: one line per evaluated user and split whose counts reproduce the recorded metrics; with
    ``hellm-ds import``'s mapping files the lines carry the original ids. The pipeline's recommend examples
    (``recommend_examples``) on the same export: 3 test users × 10 items, none from their history."""
    import torch

    from hellm_ds.eval.metrics import per_user_metrics
    from hellm_ds.pipeline import recommend_examples
    from hellm_ds.exports import load_run_dataset

    data = tmp_path / "data"
    shutil.copytree(tables[0], data)
    f = tmp_path / "per_user.jsonl"
    rc, out, err = _cli(capsys, "evaluate", "--checkpoint", trained, "--data", data, "--quiet", "--device",
                        "cpu", "--per-user", f)
    assert rc == 0, err
    got = json.loads(out)
    want = json.loads((trained / RESULTS_NAME).read_text())
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    assert rows == sorted(rows, key=lambda r: (r["split"], r["user"]))
    ds, _ = load_run_dataset(trained, data)
    for split in ("valid", "test"):
        mine = [r for r in rows if r["split"] == split]
        assert [r["user"] for r in mine] == ds.split(split).users.tolist()  # every user once
        assert all("raw_user" not in r and "raw_target" not in r for r in mine)
        assert all(isinstance(r["title"], str) for r in mine)
        for proto in ("paper", "filtered"):
            h = torch.tensor([r[proto]["above"] for r in mine])
            t = torch.tensor([r[proto]["ties"] for r in mine])
            m = per_user_metrics(h, ties=t, rule="expected")
            for k in ("Recall@10", "NDCG@20"):
                assert float(m[k].mean()) == pytest.approx(want[split][proto][k], abs=1e-6), (split, proto, k)
                assert float(m[k].mean()) == pytest.approx(got[split][proto][k], abs=1e-9), (split, proto, k)
            if proto == "paper" and int(t.sum()) == 0:
                assert float((h < 10).double().mean()) == pytest.approx(want[split][proto]["Recall@10"])

    (data / "user_ids.tsv").write_text("".join(f"{u}\tU-{u * 7}\n" for u in range(1, ds.n_users + 1)))
    (data / "item_ids.tsv").write_text("".join(f"{i}\tB{i:05d}\n" for i in range(1, ds.n_items + 1)))
    rc, out, err = _cli(capsys, "evaluate", "--checkpoint", trained, "--data", data, "--quiet", "--device",
                        "cpu", "--splits", "test", "--per-user", f)
    assert rc == 0, err
    raw = [json.loads(line) for line in f.read_text().splitlines()]
    assert {r["split"] for r in raw} == {"test"} and len(raw) == ds.split("test").users.size
    for r in raw:
        assert r["user_id"] == int(ds.user_ids[r["user"]]) and r["raw_user"] == f"U-{r['user_id'] * 7}"
        assert r["raw_target"] == f"B{r['target']:05d}" and r["title"] == ds.item_texts[r["target"]]
    assert [r["paper"] for r in raw] == [r["paper"] for r in rows if r["split"] == "test"]

    run_ds, _ = load_run_dataset(trained, data)  # the mapping files are not part of the fingerprint
    ex = recommend_examples(trained, run_ds)
    first = [int(run_ds.user_ids[u]) for u in run_ds.split("test").users[:3]]
    assert [e["user"] for e in ex] == first
    for e in ex:
        assert len(e["items"]) == 10 and 0 not in e["items"]
        read = run_ds.history(int(run_ds.user_index([e["user"]])[0]))[-run_ds.max_len:]  # what the model reads
        assert not set(e["items"]) & set(read.tolist())
        assert e["raw_user"] == f"U-{e['user'] * 7}" and e["raw_items"] == [f"B{i:05d}" for i in e["items"]]
        assert len(e["titles"]) == 10


def test_evaluate_refuses_other_dataset(trained, tables, tmp_path, capsys):
    from hellm_ds.data.synth import SynthConfig, write_synthetic

    other = write_synthetic(tmp_path / "other", SynthConfig(users=200, items=60, seed=3))
    rc, out, err = _cli(capsys, "evaluate", "--checkpoint", trained, "--data", other, "--quiet")
    assert rc == 2 and out == ""
    assert "items" in err and "Traceback" not in err
    # the same files with another history length are another dataset (the fingerprint covers max_len)
    rc, out, err = _cli(capsys, "evaluate", "--checkpoint", trained, "--data", tables[0], "--max-len", 12,
                        "--quiet")
    assert rc == 2 and out == "" and "fingerprint" in err
    with pytest.raises(SystemExit) as e:  # checked by the parser, before the export is read
        _cli(capsys, "evaluate", "--checkpoint", trained, "--data", tables[0], "--splits", "train")
    assert e.value.code == 2 and "--splits" in capsys.readouterr().err


def test_evaluate_refuses_damaged_export(trained, tables, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(trained, bad, ignore=shutil.ignore_patterns("checkpoints"))
    blob = (trained / ADAPTER_NAME).read_bytes()
    (bad / ADAPTER_NAME).write_bytes(blob[: len(blob) // 2])  # truncated
    rc, out, err = _cli(capsys, "evaluate", "--checkpoint", bad, "--data", tables[0], "--quiet")
    assert rc == 2 and out == "" and ADAPTER_NAME in err and "Traceback" not in err

    (bad / ADAPTER_NAME).write_bytes(blob)
    (bad / ADAPTER_CONFIG).write_text('{"model": {')  # garbled config
    rc, out, err = _cli(capsys, "evaluate", "--checkpoint", bad, "--data", tables[0], "--quiet")
    assert rc == 2 and out == "" and ADAPTER_CONFIG in err

    rc, out, err = _cli(capsys, "evaluate", "--checkpoint", tmp_path / "missing", "--data", tables[0])
    assert rc == 2 and out == ""


def test_finetune_subcommand_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--graph-emb", "--seq-emb", "--deepspeed_config", "--epochs", "--resume", "launch/finetune.py"):
        assert flag in out, flag
    with pytest.raises(SystemExit) as e:  # the trainer's required arguments
        main(["finetune", "--data", "d"])
    assert e.value.code == 2
