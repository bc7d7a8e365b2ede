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


# ---- the Benchmarks table (results/bench/*.json) --------------------------------------------------------
from hellm_ds.report import GPU_PENDING, format_bench_table, load_bench  # noqa: E402

BENCH_BEGIN, BENCH_END = "<!-- results:bench:begin -->", "<!-- results:bench:end -->"


def test_committed_bench_files_carry_their_provenance():
    files, gpu = load_bench(ROOT / "results" / "bench")
    kinds = {f["benchmark"] for f in files}
    assert {"kernels", "eval", "import"} <= kinds, kinds
    for f in files:
        cmd = f["command"].split()
        assert cmd[0] == "python" and cmd[1].startswith("launch/bench_") and (ROOT / cmd[1]).is_file()
        assert cmd[cmd.index("--out") + 1] == f"results/bench/{f['_file']}"  # the command wrote this very file
        env = f["environment"]
        assert env["date"] and env["git_commit"] and env["hardware"]["cpu"] and env["hardware"]["cores"]
        assert env["hardware"]["load"] is not None and env["versions"]["torch"]
    evals = [f for f in files if f["benchmark"] == "eval"]
    assert evals and all(f["summary"]["ties"] in ("expected", "optimistic") and f["summary"]["correct"]
                         for f in evals)
    assert any(f.get("model") for f in evals), "no end-to-end (checkpoint) evaluation benchmark"


def test_readme_bench_table_is_generated_and_check_sees_an_edit(tmp_path, capsys):
    text = (ROOT / "README.md").read_text()
    assert text.count(BENCH_BEGIN) == 1 and text.count(BENCH_END) == 1
    table = text[text.index(BENCH_BEGIN): text.index(BENCH_END)]
    files, gpu = load_bench(ROOT / "results" / "bench")
    assert format_bench_table(files, gpu) in table
    if gpu is None:
        assert GPU_PENDING in table
    # a copy of the README with one figure of the bench table changed: --check fails, a rerun restores it
    row = next(ln for ln in table.splitlines() if "bench_import.py" in ln)
    readme = tmp_path / "README.md"
    readme.write_text(text.replace(row, row.replace(" s, peak", " s (edited by hand), peak", 1)))
    assert report(ROOT / "results", readme, check=True)["up_to_date"] is False
    assert main(["report", "--results", str(ROOT / "results"), "--readme", str(readme), "--check"]) == 1
    assert main(["report", "--results", str(ROOT / "results"), "--readme", str(readme)]) == 0
    capsys.readouterr()
    assert readme.read_text() == text


def _bench_file(root: Path, name: str, payload: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    env = {"date": "2026-12-04", "git_commit": "abc+dirty",
           "hardware": {"cpu": "CPU X", "cores": 2, "gpu": None, "load": 1.5}, "versions": {"torch": "2"}}
    (root / name).write_text(json.dumps({"command": f"python launch/x.py --out results/bench/{name}",
                                         "environment": env, **payload}))


def test_bench_rows_and_the_pending_gpu_row(tmp_path):
    results = tmp_path / "results"
    _write(results, "ds", "a", [0.1])
    recs = [{"name": f"import_{n}", "params": {"interactions": n, "k_core": 5, "dedup": False}, "status": "ok",
             "metrics": {"csv_mb": n / 4e4, "import_s": n / 4e5, "peak_rss_mb": n / 1e4, "users": n // 20,
                         "items": n // 50}, "note": ""} for n in (1_000_000, 10_000_000)]
    _bench_file(results / "bench", "import.json", {"benchmark": "import", "threads": "1", "results": recs,
                                                   "summary": {}})
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:ds:begin -->\n<!-- results:ds:end -->\nx\n" + BENCH_BEGIN + "\nold\n"
                      + BENCH_END + "\n")
    assert report(results, readme)["tables"] == ["bench", "ds"]
    text = readme.read_text()
    assert "| `python launch/x.py --out results/bench/import.json` | 2-core CPU X (CPU), 1 thread, load 1.5, " \
           "2026-12-04 |" in text
    assert "1 M interactions (25 MB; 50,000 users × 20,000 items kept) in 2.5 s, peak 100 MB" in text
    assert "10× the log: 10.0× the time, 10.0× the peak memory" in text
    assert f"| `bash launch/gpu_check.sh` | – | {GPU_PENDING} |" in text
    assert "commit abc with uncommitted changes" in text
    # a bench file without its provenance is refused, not rendered
    (results / "bench" / "bad.json").write_text(json.dumps({"benchmark": "eval", "results": [], "summary": {}}))
    with pytest.raises(DataFormatError, match="bad.json"):
        report(results, readme, check=True)


def _kernel_rec(case, graph, method, ms, dtype="fp32", d=64):
    return {"name": f"{case}/{method}", "status": "ok", "note": "",
            "params": {"case": case, "graph": graph, "d": d, "dtype": dtype, "method": method},
            "metrics": {"ms": ms, "correct": True}}


def test_kernel_rows_compare_different_paths_only(tmp_path):
    """On CPU the project's SpMM is the torch CSR `@` the baseline times: no such ratio, only its noise; COO
    and the materialised product are compared. On a GPU the project's kernels are compared with cuSPARSE."""
    recs = [_kernel_rec("spmm", "data:toys", "project[torch]", 2.2), _kernel_rec("spmm", "data:toys", "torch_csr", 2.0),
            _kernel_rec("spmm", "data:toys", "torch_coo", 5.0), _kernel_rec("u2u", "data:toys", "project[torch]", 6.0),
            _kernel_rec("u2u", "data:toys", "materialised", 30.0)]
    root = tmp_path / "bench"
    _bench_file(root, "kernels_cpu.json", {"benchmark": "kernels", "device_type": "cpu", "torch_threads": 1,
                                           "config": {"repeats": 10}, "results": recs, "summary": []})
    gpu_recs = [_kernel_rec("spmm", "powerlaw-1Mx300k-16M", m, ms, dt) for m, ms, dt in
                (("project[triton]", 1.0, "fp32"), ("torch_csr", 1.5, "fp32"), ("project[triton]", 0.5, "bf16"),
                 ("torch_csr", 1.4, "bf16"))]
    _bench_file(root, "kernels_gpu.json", {"benchmark": "kernels", "device_type": "cuda", "config": {"repeats": 20},
                                           "results": gpu_recs, "summary": []})
    files, gpu = load_bench(root)
    table = format_bench_table(files, gpu)
    cpu_row, gpu_row = [ln for ln in table.splitlines() if "launch/x.py" in ln]
    assert "Toys: COO `sparse.mm` 2.50× the time of torch CSR `@` (MKL)" in cpu_row
    assert "one two-stage U2U (R Rᵀ) layer 5.00× faster than one SpMM with the materialised product" in cpu_row
    assert "differs by up to 10 %" in cpu_row and "No project-vs-MKL SpMM figure" in cpu_row
    assert "project SpMM" not in cpu_row.split("No project-vs-MKL")[0]
    assert "power-law 1M×300k (16M nnz): project SpMM 1.50× the speed of cuSPARSE (fp32), project SpMM 2.80× " \
           "the speed of cuSPARSE (bf16)" in gpu_row
    assert "No project-vs-MKL" not in gpu_row


def test_the_whole_pipeline_time_is_stated_with_its_load(tmp_path):
    """A row whose runs carry the seed's whole-pipeline seconds (collect.py: the sum of its stages) gets one
    line under the table: mean and maximum wall time and the load the runs ended with."""
    from hellm_ds.report import format_table

    results = tmp_path / "results"
    _write(results, "ds", "hellm", [0.10, 0.12])
    path = results / "ds" / "hellm.json"
    res = json.loads(path.read_text())
    for run, (secs, load) in zip(res["runs"], ((2400.0, [2.1, 2.0, 1.9]), (2640.0, [2.6, 2.2, 2.0]))):
        run.update(pipeline_seconds=secs, pipeline_load=load)
    text = format_table([res])
    assert ("The whole `hellm-ds pipeline` of a seed (every stage, evaluation included): 42.0 min on average, "
            "at most 44.0 min (seeds 0, 1; 1-minute load 2.1–2.6 at its end).") in text
    _write(results, "ds", "plain", [0.1])
    assert "whole" not in format_table([json.loads((results / "ds" / "plain.json").read_text())])
