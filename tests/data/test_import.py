"""``hellm-ds import`` (``hellm_ds/data/importers.py``, ``ids.py``, ``import_data.py``) and the loader's strict
inputs: a raw log imports to the same dataset as the S3-Rec file written directly; Amazon reviews + metadata
(gzip) give sequences, titles and attributes; k-core matches a brute-force reference; sparse raw ids, a
dataset with nothing to evaluate and a BOM file behave as documented."""
from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pytest

from hellm_ds.cli import _print_json, main
from hellm_ds.data.dataset import load_dataset
from hellm_ds.data.ids import k_core
from hellm_ds.data.synth import SynthConfig, generate
from hellm_ds.errors import DataFormatError


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def run(capsys, *argv) -> tuple[int, dict | None, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, (strict_loads(cap.out) if cap.out.strip() else None), cap.err


def tsv(path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


# ---- a synthetic raw log → the S3-Rec file ---------------------------------------------------------------
def synth_sequences(seed: int = 3):
    seqs = generate(SynthConfig(users=300, items=40, seed=seed))["sequences"]
    assert len(np.unique(np.concatenate(seqs))) == 40  # every item used: dense ids are the identity
    return seqs


def raw_log(seqs, user_name, item_name, seed: int = 0) -> list[tuple[str, str, int]]:
    rng = np.random.default_rng(seed)
    rows = []
    for u, s in enumerate(seqs, 1):
        times = np.cumsum(rng.integers(1, 1000, len(s))) + 10**9
        rows += [(user_name(u), item_name(int(i)), int(t)) for i, t in zip(s, times)]
    rng.shuffle(rows)  # global input order is irrelevant: timestamps decide
    return rows


def write_s3rec(path, seqs) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "sequences.txt").write_text("".join(f"{u} " + " ".join(map(str, s)) + "\n" for u, s in enumerate(seqs, 1)))


def test_csv_import_equals_the_s3rec_file(tmp_path, capsys):
    seqs = synth_sequences()
    write_s3rec(tmp_path / "direct", seqs)
    rows = raw_log(seqs, str, str)
    (tmp_path / "log.csv").write_text("".join(f"{u},{i},{t}\n" for u, i, t in rows))
    rc, summary, err = run(capsys, "import", "--format", "csv", "--input", str(tmp_path / "log.csv"),
                           "--out", str(tmp_path / "imported"))
    assert rc == 0, err
    assert summary["users"] == 300 and summary["items"] == 40 and summary["interactions"] == len(rows)
    assert summary["dropped"] == {}
    assert (tmp_path / "imported/sequences.txt").read_bytes() == (tmp_path / "direct/sequences.txt").read_bytes()
    a, b = load_dataset(tmp_path / "imported"), load_dataset(tmp_path / "direct")
    assert np.array_equal(a.items, b.items) and np.array_equal(a.offsets, b.offsets)
    assert tsv(tmp_path / "imported/user_ids.tsv")[:3] == [["1", "1"], ["2", "2"], ["3", "3"]]  # numeric order
    assert strict_loads((tmp_path / "imported/import.json").read_text())["interactions"] == len(rows)


def test_string_ids_tsv_with_named_columns_and_mapping_files(tmp_path, capsys):
    seqs = synth_sequences(seed=5)
    rng = np.random.default_rng(1)
    uname = {u: f"U{x:05d}" for u, x in zip(range(1, 301), rng.permutation(300))}
    iname = {i: f"item-{x}" for i, x in zip(range(1, 41), rng.permutation(40))}
    rows = raw_log(seqs, uname.get, iname.get)
    (tmp_path / "log.tsv").write_text("\ufeffts\tuser_id\titem_id\trating\r\n"  # BOM + CRLF
                                      + "".join(f"{t}\t{u}\t{i}\t4.5\r\n" for u, i, t in rows), encoding="utf-8")
    rc, summary, err = run(capsys, "import", "--format", "csv", "--input", str(tmp_path / "log.tsv"),
                           "--columns", "user_id,item_id,ts,rating", "--min-rating", "4", "--out",
                           str(tmp_path / "d"))
    assert rc == 0, err
    assert summary["dropped"] == {"min_rating": 0}
    users = {raw: int(j) for j, raw in tsv(tmp_path / "d/user_ids.tsv")}
    items = {int(j): raw for j, raw in tsv(tmp_path / "d/item_ids.tsv")}
    assert list(users) == sorted(users)  # dense ids in raw-id text order
    ds = load_dataset(tmp_path / "d", max_len=1000)
    for u, s in enumerate(seqs, 1):
        got = ds.history(int(ds.user_index([users[uname[u]]])[0]))
        assert [items[int(i)] for i in got] == [iname[int(i)] for i in s]


def test_ties_keep_input_order_and_filters(tmp_path, capsys):
    (tmp_path / "log.csv").write_text(
        "user,item,time,rating\n"
        "b,x,5,5\n"
        "a,z,2,1\n"  # dropped by --min-rating 3
        "a,y,2,4\n"
        "a,x,2,4\n"  # same timestamp as y: input order decides (y then x)
        "a,y,9,5\n"  # a repeat of (a, y): dropped by --dedup
        "a,w,1,5\n"
        "b,w,1,5\n")
    rc, summary, err = run(capsys, "import", "--format", "csv", "--input", str(tmp_path / "log.csv"),
                           "--columns", "user,item,time,rating", "--min-rating", "3", "--dedup", "--out",
                           str(tmp_path / "d"))
    assert rc == 0, err
    assert summary["dropped"] == {"min_rating": 1, "duplicates": 1}
    assert (summary["users"], summary["items"], summary["interactions"]) == (2, 3, 5)
    assert tsv(tmp_path / "d/item_ids.tsv") == [["1", "w"], ["2", "x"], ["3", "y"]]
    assert (tmp_path / "d/sequences.txt").read_text() == "1 1 3 2\n2 1 2\n"


def test_out_must_be_empty_unless_overwrite(tmp_path, capsys):
    (tmp_path / "log.csv").write_text("1,1,1\n1,2,2\n1,3,3\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d/keep.txt").write_text("mine")
    argv = ["import", "--format", "csv", "--input", str(tmp_path / "log.csv"), "--out", str(tmp_path / "d")]
    rc, _, err = run(capsys, *argv)
    assert rc == 2 and "not empty" in err and (tmp_path / "d/keep.txt").read_text() == "mine"
    rc, _, err = run(capsys, *argv, "--overwrite")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["import.json", "item_ids.tsv", "sequences.txt",
                                                                  "user_ids.tsv"]


def test_bad_timestamp_names_file_line_value(tmp_path, capsys):
    (tmp_path / "log.csv").write_text("u,i,t\n1,1,5\n1,2,soon\n")
    rc, out, err = run(capsys, "import", "--format", "csv", "--input", str(tmp_path / "log.csv"),
                       "--out", str(tmp_path / "d"))
    assert rc == 2 and out is None
    assert f"{tmp_path / 'log.csv'}:3:" in err and "'soon'" in err
    assert not (tmp_path / "d").exists()


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "log.parquet").write_bytes(b"PAR1")
    rc, _, err = run(capsys, "import", "--format", "parquet", "--input", str(tmp_path / "log.parquet"),
                     "--out", str(tmp_path / "d"))
    assert rc == 2 and "pyarrow" in err and "hellm_ds[parquet]" in err


def test_parquet_import(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"u": ["a", "a", "b"], "i": [3, 1, 3], "t": [2, 1, 1]}), tmp_path / "log.parquet")
    rc, summary, err = run(capsys, "import", "--format", "parquet", "--input", str(tmp_path / "log.parquet"),
                           "--columns", "u,i,t", "--out", str(tmp_path / "d"))
    assert rc == 0, err
    assert (tmp_path / "d/sequences.txt").read_text() == "1 1 2\n2 2\n"
    import datetime as dt

    days = [dt.datetime(2020, 1, d) for d in (3, 1, 2)]  # a timestamp-typed column, positional columns
    pq.write_table(pa.table({"x": [0, 0, 0], "u": ["a", "a", "a"], "i": ["p", "q", "r"], "t": days}),
                   tmp_path / "log2.parquet")
    rc, summary, err = run(capsys, "import", "--format", "parquet", "--input", str(tmp_path / "log2.parquet"),
                           "--columns", "1,2,3", "--out", str(tmp_path / "d2"))
    assert rc == 0, err
    assert (tmp_path / "d2/sequences.txt").read_text() == "1 2 3 1\n"


# ---- RecBole --------------------------------------------------------------------------------------------
def test_recbole_inter_and_item(tmp_path, capsys):
    (tmp_path / "x.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "7\t100\t5\t3\n7\t200\t4\t1\n8\t100\t2\t2\n")
    (tmp_path / "x.item").write_text(
        "item_id:token\ttitle:token_seq\tcategories:token_seq\tprice:float\n"
        "100\tA Lamp\tHome Light\t3.5\n200\tA Book\tBooks\t9\n999\tUnused\tX\t1\n")
    rc, summary, err = run(capsys, "import", "--format", "recbole", "--input", str(tmp_path / "x.inter"),
                           "--item-file", str(tmp_path / "x.item"), "--out", str(tmp_path / "d"))
    assert rc == 0, err
    assert (tmp_path / "d/sequences.txt").read_text() == "1 2 1\n2 1\n"
    assert tsv(tmp_path / "d/items.tsv") == [["1", "A Lamp"], ["2", "A Book"]]
    names = dict(tsv(tmp_path / "d/attribute_ids.tsv"))
    attrs = json.loads((tmp_path / "d/item2attributes.json").read_text())
    assert {names[str(a)] for a in attrs["1"]} == {"categories:Home", "categories:Light"}
    assert {names[str(a)] for a in attrs["2"]} == {"categories:Books"}
    ds = load_dataset(tmp_path / "d")
    assert ds.item_texts[1] == "A Lamp" and ds.modalities["attributes"].dim == 3


# ---- Amazon reviews + metadata (gzip) -------------------------------------------------------------------
def test_amazon_reviews_and_metadata(tmp_path, capsys):
    rng = np.random.default_rng(7)
    reviews = []
    for n in range(400):
        u, i = f"A{int(rng.integers(0, 40)):03d}X", f"B00{int(rng.zipf(1.5)) % 30:04d}"
        reviews.append({"reviewerID": u, "asin": i, "unixReviewTime": int(rng.integers(1.2e9, 1.4e9)),
                        "overall": float(rng.integers(1, 6)), "reviewText": "fine"})
    with gzip.open(tmp_path / "reviews.json.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in reviews)
    asins = sorted({r["asin"] for r in reviews})
    with gzip.open(tmp_path / "meta.json.gz", "wt") as f:
        for n, a in enumerate(asins):
            m = {"asin": a, "title": f"Toy {n}\tdeluxe", "categories": [["Toys", f"Cat{n % 3}"]], "brand": f"B{n % 2}"}
            f.write((repr(m) if n % 2 else json.dumps(m)) + "\n")  # 2014 dumps: Python literals
        f.write(repr({"asin": "UNUSED", "title": "never bought"}) + "\n")
    rc, summary, err = run(capsys, "import", "--format", "amazon", "--input", str(tmp_path / "reviews.json.gz"),
                           "--meta", str(tmp_path / "meta.json.gz"), "--dedup", "--k-core", "5",
                           "--out", str(tmp_path / "d"))
    assert rc == 0, err

    # reference: dedup (earliest), 5-core by brute force, chronological with input-order ties
    first = {}
    for n, r in sorted(enumerate(reviews), key=lambda x: (x[1]["reviewerID"], x[1]["unixReviewTime"], x[0])):
        first.setdefault((r["reviewerID"], r["asin"]), (r["unixReviewTime"], n))
    kept = brute_k_core(list(first), 5)
    users, items = sorted({u for u, _ in kept}), sorted({i for _, i in kept})
    assert (summary["users"], summary["items"], summary["interactions"]) == (len(users), len(items), len(kept))
    assert summary["dropped"] == {"duplicates": len(reviews) - len(first), "k_core": len(first) - len(kept)}
    iid = {a: j for j, a in enumerate(items, 1)}
    expect = "".join(
        f"{j} " + " ".join(str(iid[i]) for i in sorted((i for uu, i in kept if uu == u), key=lambda i: first[u, i]))
        + "\n" for j, u in enumerate(users, 1))
    assert (tmp_path / "d/sequences.txt").read_text() == expect
    assert [r for _, r in tsv(tmp_path / "d/item_ids.tsv")] == items
    titles = dict(tsv(tmp_path / "d/items.tsv"))
    assert titles["1"] == f"Toy {asins.index(items[0])} deluxe"  # a tab in a title became a space
    names = dict(tsv(tmp_path / "d/attribute_ids.tsv"))
    attrs = json.loads((tmp_path / "d/item2attributes.json").read_text())
    n0 = asins.index(items[0])
    assert {names[str(a)] for a in attrs["1"]} == {"category:Toys", f"category:Cat{n0 % 3}", f"brand:B{n0 % 2}"}
    ds = load_dataset(tmp_path / "d")
    assert ds.n_items == len(items) and "attributes" in ds.modalities and ds.item_texts is not None


def brute_k_core(pairs, k):
    pairs = set(pairs)
    while True:
        uc, ic = {}, {}
        for u, i in pairs:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        keep = {(u, i) for u, i in pairs if uc[u] >= k and ic[i] >= k}
        if keep == pairs:
            return keep
        pairs = keep


@pytest.mark.parametrize("seed", range(20))
def test_k_core_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    u = rng.integers(0, int(rng.integers(1, 40)), n)
    i = rng.integers(0, int(rng.integers(1, 40)), n)
    key = np.unique(u * 1000 + i)  # k-core of distinct pairs
    u, i = key // 1000, key % 1000
    k = int(rng.integers(1, 6))
    mask = k_core(u, i, k)
    assert set(zip(u[mask].tolist(), i[mask].tolist())) == brute_k_core(zip(u.tolist(), i.tolist()), k)


# ---- strict inputs and outputs --------------------------------------------------------------------------
def test_sparse_raw_item_id_is_refused_naming_file_line_value(tmp_path, capsys):
    (tmp_path / "sequences.txt").write_text("1 1 2 3\n2 2 3 1000000000 4\n3 1 4\n")
    with pytest.raises(DataFormatError) as e:
        load_dataset(tmp_path)
    assert e.value.path == str(tmp_path / "sequences.txt") and e.value.line == 2 and e.value.value == 1000000000
    assert "hellm-ds import" in str(e.value) and "2 × distinct + 1000" in str(e.value)
    rc, out, err = run(capsys, "stats", "--data", str(tmp_path))
    assert rc == 2 and out is None and f"sequences.txt:2:" in err and "1000000000" in err


def test_ids_at_the_limit_load(tmp_path):
    (tmp_path / "sequences.txt").write_text("1 1 2 1006\n")  # 3 distinct: limit 2*3 + 1000
    assert load_dataset(tmp_path).n_items == 1006


def test_no_user_with_three_items_exits_2_and_json_stays_strict(tmp_path, capsys):
    (tmp_path / "sequences.txt").write_text("1 1 2\n2 2 3\n")
    rc, out, err = run(capsys, "baseline", "popularity", "--data", str(tmp_path), "--quiet")
    assert rc == 2 and out is None
    assert "no user" in err and "≥ 3 items" in err
    # what an empty evaluation returns prints as strict JSON: null, with the user count
    from hellm_ds.eval.metrics import MetricAccumulator

    res = MetricAccumulator().result()
    assert res["users"] == 0
    _print_json({"test": res, "inf": float("inf")})
    printed = strict_loads(capsys.readouterr().out)
    assert printed["test"]["Recall@10"] is None and printed["inf"] is None and printed["test"]["users"] == 0


def test_bom_files_load(tmp_path):
    (tmp_path / "sequences.txt").write_bytes(b"\xef\xbb\xbf1 1 2 3\r\n2 2 3\r\n")
    (tmp_path / "items.tsv").write_bytes("\ufeff1\tfirst\r\n2\tsecond\n".encode())
    (tmp_path / "item2attributes.json").write_bytes(b'\xef\xbb\xbf{"1": [4], "3": [5]}')
    ds = load_dataset(tmp_path)
    assert ds.user_ids.tolist() == [1, 2] and ds.history(0).tolist() == [1, 2, 3]
    assert ds.item_texts[1] == "first" and ds.modalities["attributes"].dim == 2


def test_bom_before_bad_token_keeps_line_numbers(tmp_path):
    (tmp_path / "sequences.txt").write_bytes(b"\xef\xbb\xbf1 1 2\n2 x\n")
    with pytest.raises(DataFormatError) as e:
        load_dataset(tmp_path)
    assert e.value.line == 2 and e.value.value == "x"


def test_blank_lines_keep_error_line_numbers(tmp_path, capsys):
    (tmp_path / "log.csv").write_text("1,1,5\n\n1,2,6\n\n\n1,3,x\n")
    rc, _, err = run(capsys, "import", "--format", "csv", "--delimiter", ",", "--input", str(tmp_path / "log.csv"),
                     "--out", str(tmp_path / "d"))
    assert rc == 2 and f"log.csv:6:" in err and "'x'" in err
    (tmp_path / "log.csv").write_text("1,1,5\n\n1,2,6\n")
    rc, summary, err = run(capsys, "import", "--format", "csv", "--input", str(tmp_path / "log.csv"),
                           "--out", str(tmp_path / "d"))
    assert rc == 0 and summary["interactions"] == 2, err
