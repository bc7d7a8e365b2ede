"""`hellm-ds recommend`: the chunked running top-k equals a brute-force top-k of the model's own logits,
with and without history exclusion; batch mode from a file; titles; unknown ids name the id and line."""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from hellm_ds.cli import main as cli_main
from hellm_ds.data.dataset import load_dataset
from hellm_ds.eval.recommend import top_k

from tests.train.common import run


def test_chunked_top_k_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    u, W, b = torch.randn(5, 7, generator=g), torch.randn(50, 7, generator=g), torch.randn(50, generator=g)
    hist = torch.tensor([[0, 0, 3], [1, 2, 49], [0, 0, 0], [10, 11, 12], [5, 5, 6]])
    for exclude in (None, hist):
        full = u @ W.T + b
        full[:, 0] = float("-inf")
        if exclude is not None:
            for r in range(5):
                full[r, exclude[r][exclude[r] > 0]] = float("-inf")
        want_s, want_i = full.topk(8, dim=1)
        s, i = top_k(u, W, b, 8, exclude=exclude, chunk=6)  # many chunks, a ragged last one
        assert torch.equal(i, want_i) and torch.allclose(s, want_s)


@pytest.fixture(scope="module")
def export(tables, tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "run"
    run(tables, out, "--epochs", "1", "--steps-per-epoch", "3", "--skip-eval", "--item-head", "tied")
    return out


def _cli(*args) -> tuple[int, dict | None]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = cli_main(["recommend", *map(str, args)])
    return rc, (json.loads(buf.getvalue()) if rc == 0 else None)


def test_recommend_matches_the_model_logits(tables, export, tmp_path):
    from hellm_ds.data.batching import left_pad
    from hellm_ds.exports import load_adapter

    data = tables[0]
    ds = load_dataset(data, max_len=10)
    users = [int(x) for x in ds.user_ids[[0, 7, 42]]]
    model = load_adapter(export)
    idx = ds.user_index(users)
    ids = torch.from_numpy(left_pad(ds.items, ds.offsets[idx], ds.offsets[idx + 1], 10))
    with torch.no_grad():
        logits = model({"input_ids": ids, "attention_mask": (ids != 0).long()})
    for exclude in (False, True):
        args = ["--checkpoint", export, "--data", data, "--users", ",".join(map(str, users)), "--k", 5, "--quiet"]
        rc, res = _cli(*args, *(["--exclude-history"] if exclude else []))
        assert rc == 0 and [r["user"] for r in res["users"]] == users
        want = logits.clone()
        for r, u in enumerate(idx):
            if exclude:
                want[r, torch.from_numpy(ds.history(u).copy())] = float("-inf")
            got = res["users"][r]
            assert got["items"] == want[r].topk(5).indices.tolist()
            assert got["scores"] == pytest.approx(want[r].topk(5).values.tolist(), abs=1e-4)
            assert len(got["titles"]) == 5 and all(isinstance(t, str) for t in got["titles"])
            if exclude:
                assert not set(got["items"]) & set(ds.history(u).tolist())
            assert 0 not in got["items"]

    # batch mode: a file of ids (comments, blank lines) gives the same answer as --users
    f = tmp_path / "users.txt"
    f.write_text(f"# users\n{users[0]}\n\n{users[1]}  # second\n{users[2]}\n")
    rc, from_file = _cli("--checkpoint", export, "--data", data, "--users-file", f, "--k", 5, "--quiet")
    rc2, direct = _cli("--checkpoint", export, "--data", data, "--users", ",".join(map(str, users)), "--k", 5,
                       "--quiet")
    assert rc == rc2 == 0 and from_file == direct


def test_recommend_errors_name_the_id_and_line(tables, export, tmp_path, capsys):
    data = tables[0]
    unknown = int(np.max(load_dataset(data).user_ids)) + 1000
    rc, _ = _cli("--checkpoint", export, "--data", data, "--users", f"1,{unknown}")
    assert rc == 2 and f"unknown user id {unknown}" in capsys.readouterr().err
    f = tmp_path / "users.txt"
    f.write_text(f"1\n{unknown}\n")
    rc, _ = _cli("--checkpoint", export, "--data", data, "--users-file", f)
    err = capsys.readouterr().err
    assert rc == 2 and f"{f}:2" in err and str(unknown) in err
    f.write_text("1\nabc\n")
    rc, _ = _cli("--checkpoint", export, "--data", data, "--users-file", f)
    assert rc == 2 and f"{f}:2" in capsys.readouterr().err


def test_recommend_reports_raw_ids_of_an_imported_dataset(tables, export, tmp_path, capsys):
    """With ``hellm-ds import``'s mapping files next to the dataset, answers carry the original ids, and
    ``--raw-ids`` takes users by them (the files are not part of the dataset's fingerprint)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tables[0], data)
    ds = load_dataset(data)
    assert ds.user_ids.tolist() == list(range(1, ds.n_users + 1))
    (data / "user_ids.tsv").write_text("".join(f"{u}\tU-{u * 7}\n" for u in range(1, ds.n_users + 1)))
    (data / "item_ids.tsv").write_text("".join(f"{i}\tB{i:05d}\n" for i in range(1, ds.n_items + 1)))
    rc, plain = _cli("--checkpoint", export, "--data", data, "--users", "3,1", "--k", 4, "--quiet")
    assert rc == 0
    rc, raw = _cli("--checkpoint", export, "--data", data, "--users", "U-21,U-7", "--raw-ids", "--k", 4, "--quiet")
    assert rc == 0 and raw == plain
    for rec in raw["users"]:
        assert rec["raw_user"] == f"U-{rec['user'] * 7}"
        assert rec["raw_items"] == [f"B{i:05d}" for i in rec["items"]] and len(rec["titles"]) == 4
    f = tmp_path / "users.txt"
    f.write_text("U-21\n# c\nU-nobody\n")
    rc, _ = _cli("--checkpoint", export, "--data", data, "--users-file", f, "--raw-ids")
    err = capsys.readouterr().err
    assert rc == 2 and f"{f}:3" in err and "U-nobody" in err
    rc, _ = _cli("--checkpoint", export, "--data", tables[0], "--users", "U-7", "--raw-ids")
    assert rc == 2 and "user_ids.tsv" in capsys.readouterr().err
