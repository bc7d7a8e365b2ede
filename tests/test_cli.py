"""The `hellm-ds` command line: JSON on stdout, one-line errors with exit status 2."""
import json
import subprocess
import sys

import pytest

from hellm_ds.cli import main


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "hellm_ds", *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_synth_stats_popularity_roundtrip(tmp_path):
    rc, out, err = run_cli("synth", "--out", str(tmp_path / "d"), "--users", "120", "--items", "40", "--seed", "1")
    assert rc == 0, err
    synth = json.loads(out)
    assert synth["users"] == 120 and synth["items"] == 40
    rc, out, _ = run_cli("stats", "--data", str(tmp_path / "d"))
    stats = json.loads(out)
    assert set(stats) >= {"users", "items", "interactions", "train_samples", "valid_users", "test_users", "modalities"}
    assert stats["modalities"] == {"attributes": synth["modalities"]["attributes"], "image": 32, "text": 24}
    rc, out, _ = run_cli("baseline", "popularity", "--data", str(tmp_path / "d"), "--quiet")
    res = json.loads(out)
    assert set(res) == {"valid", "test", "ties"} and res["ties"] == "expected"
    for split in (res["valid"], res["test"]):
        assert set(split) == {"paper", "filtered"}
        for m in ("Recall", "NDCG", "MRR", "Precision", "MAP"):
            for k in (5, 10, 20):
                assert 0.0 <= split["paper"][f"{m}@{k}"] <= 1.0


def test_bad_input_exits_2_with_file_line_value(tmp_path, capsys):
    (tmp_path / "sequences.txt").write_text("1 4 5 6\n2 7 x8 9\n")
    assert main(["stats", "--data", str(tmp_path)]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    assert f"{tmp_path / 'sequences.txt'}:2:" in cap.err and "x8" in cap.err
    assert "Traceback" not in cap.err


def test_synth_refuses_non_empty_dir(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["synth", "--out", str(tmp_path), "--users", "10", "--items", "8"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_console_script_and_version():
    rc, out, _ = run_cli("--version")
    assert rc == 0 and out.startswith("hellm-ds ")


@pytest.mark.parametrize("argv", [[], ["nonsense"], ["baseline"]])
def test_usage_errors(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


def test_build_graphs_prints_sizes_and_caches(synth_dir, tmp_path):
    rc, out, err = run_cli("build-graphs", "--data", str(synth_dir), "--out", str(tmp_path), "--knn-k", "4",
                           "--modalities", "image,attributes")
    assert rc == 0, err
    res = json.loads(out)
    assert res["modalities"] == ["image", "attributes"] and res["nnz_H"] == 4 * 2 * res["items"]
    assert res["rrt_nnz"] > res["nnz_R"] and res["two_stage_nnz_u2u"] == 2 * res["nnz_R"]
    assert (tmp_path / res["cache"].split("/")[-1]).is_file()
    rc, _, err = run_cli("build-graphs", "--data", str(synth_dir), "--out", str(tmp_path), "--modalities", "audio")
    assert rc == 2 and "unknown modality" in err
