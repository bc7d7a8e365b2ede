"""`hellm-ds report`: the README's results tables are what the committed result files generate."""
import json
import statistics
from pathlib import Path

import pytest

from hellm_ds.cli import main
from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.report import load_results, render, report

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_are_generated_from_committed_results():
    """Fails when a README results table differs from what results/*/*.json generate (run `hellm-ds report`)."""
    res = report(ROOT / "results", ROOT / "README.md", check=True)
    assert res["tables"], "no committed result files"
    assert res["up_to_date"], "README results tables are stale: run `hellm-ds report` and commit"


def test_every_committed_result_has_both_tie_rules_and_its_provenance():
    for rows in load_results(ROOT / "results").values():
        for res in rows:
            assert (ROOT / res["script"]).is_file() and res["command"]
            env = res["environment"]
            assert env["git_commit"] and env["hardware"]["cpu"] and env["versions"]["torch"]
            for run in res["runs"]:
                for rule in ("expected", "optimistic"):
                    for proto in ("paper", "filtered"):
                        m = run["test"][rule][proto]
                        assert 0 <= m["NDCG@10"] <= m["Recall@10"] <= m["Recall@20"] <= 1
                        # the optimistic rule can only flatter
                        assert m["Recall@10"] <= run["test"]["optimistic"][proto]["Recall@10"] + 1e-12


def _metrics(r10: float) -> dict:
    m = {"Recall@10": r10, "NDCG@10": r10 / 2, "Recall@20": r10 * 1.5, "NDCG@20": r10 / 1.5, "mean_ties": 0.5}
    return {"paper": m, "filtered": {k: v + 0.01 for k, v in m.items()}}


def _write(root: Path, dataset: str, model: str, r10s: list[float], order: int = 0) -> None:
    runs = [{"seed": i, "seconds": 60.0 + i, "best_epoch": 3 + i,
             "test": {"expected": _metrics(v), "optimistic": _metrics(v)}} for i, v in enumerate(r10s)]
    (root / dataset).mkdir(parents=True, exist_ok=True)
    (root / dataset / f"{model}.json").write_text(json.dumps(
        {"dataset": dataset, "model": model, "label": f"label {model}", "order": order, "script": "s.sh",
         "command": "cmd", "runs": runs, "environment": {"date": "2026-12-04", "git_commit": "abc",
                                                         "hardware": {"cpu": "cpu", "cores": 2, "load": 1.0}}}))


def test_tables_show_mean_and_spread_and_check_detects_drift(tmp_path, capsys):
    results = tmp_path / "results"
    _write(results, "ds", "b", [0.10, 0.12, 0.14], order=2)
    _write(results, "ds", "a", [0.05], order=1)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:ds:begin -->\nold\n<!-- results:ds:end -->\nafter\n")
    assert report(results, readme, check=True) == {"readme": str(readme), "tables": ["ds"], "up_to_date": False,
                                                   "written": False}
    assert "old" in readme.read_text()  # --check changes nothing
    assert main(["report", "--results", str(results), "--readme", str(readme), "--check"]) == 1
    capsys.readouterr()
    assert main(["report", "--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith("| label")]
    assert lines[0].startswith("| label a | 0.0500 / 0.0600 |")  # order 1 first; one seed: no spread
    sd = statistics.stdev([0.10, 0.12, 0.14])
    assert lines[1].startswith(f"| label b | 0.1200 ± {sd:.4f} / 0.1300 ± {sd:.4f} |")
    assert "| 0, 1, 2 | 3, 4, 5 | 61 s | 0.5 |" in lines[1]
    assert report(results, readme, check=True)["up_to_date"]


def test_a_table_never_silently_goes_missing(tmp_path):
    results = tmp_path / "results"
    _write(results, "ds", "a", [0.1])
    with pytest.raises(UsageError, match="no <!-- results:NAME:begin -->"):
        render("no markers here\n", {"ds": "table"})
    with pytest.raises(UsageError, match="has no files"):
        render("<!-- results:other:begin -->\n<!-- results:other:end -->\n", {})
    (results / "ds" / "bad.json").write_text("{\n  oops\n}")
    with pytest.raises(DataFormatError, match="bad.json"):
        load_results(results)
    (results / "ds" / "bad.json").write_text(json.dumps({"dataset": "other", "model": "bad", "label": "x",
                                                         "runs": [{}]}))
    with pytest.raises(DataFormatError, match="do not match"):
        load_results(results)
