"""launch/bench_import.py with --out: the benchmark JSON format (header with provenance, one record per size,
summary) on a tiny synthetic log."""
from __future__ import annotations

import json

import pytest

from tests.launch.conftest import load_script


@pytest.fixture(scope="module")
def bench():
    yield from load_script("bench_import")


def test_out_writes_the_bench_format(bench, tmp_path, capsys):
    out = tmp_path / "import.json"
    bench.main(["--sizes", "2000,4000", "--k-core", "2", "--keep", str(tmp_path / "work"), "--out", str(out)])
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert [ln["interactions"] for ln in lines] == [2000, 4000]
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "import" and saved["command"].startswith("python launch/bench_import.py --sizes")
    assert saved["environment"]["hardware"]["cores"] and saved["environment"]["versions"]["numpy"]
    recs = saved["results"]
    assert [r["params"]["interactions"] for r in recs] == [2000, 4000]
    for r, ln in zip(recs, lines):
        assert r["status"] == "ok" and r["params"]["k_core"] == 2
        assert r["metrics"]["import_s"] == ln["import_s"] and r["metrics"]["peak_rss_mb"] > 0
        assert r["metrics"]["users"] == ln["users"] and r["metrics"]["kept"] <= 2 * r["params"]["interactions"]
    s = saved["summary"]["4000"]
    assert s["s_per_million"] == pytest.approx(s["import_s"] / 0.004)
