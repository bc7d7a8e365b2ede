"""Items nobody has interacted with yet (issue 16): ``catalogue.json`` declares the catalogue size, such items
load with their features, are ranked like the rest and sit in the item hypergraph; ``hellm-ds import
--keep-unseen-items`` writes them from the item table; datasets without the file are unchanged."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hellm_ds.baselines.popularity import evaluate_popularity, popularity_scores
from hellm_ds.cli import main
from hellm_ds.data.dataset import load_dataset
from hellm_ds.errors import DataFormatError
from hellm_ds.eval.ranking import rank_targets
from hellm_ds.graph.build import GraphConfig, build_graphs

SEQS = "1 1 2 3 4\n2 2 3 4\n3 3 4 1 2\n"  # items 1..4 interacted; 5 and 6 are new


def catalogue_dir(tmp_path, n_items=6, features_rows=6):
    (tmp_path / "sequences.txt").write_text(SEQS)
    (tmp_path / "catalogue.json").write_text(json.dumps({"n_items": n_items}))
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 8)).astype(np.float32)
    feats = np.concatenate([base, base[:2] + 0.01])[:features_rows]  # item 5 ≈ item 1, item 6 ≈ item 2
    (tmp_path / "features").mkdir()
    np.save(tmp_path / "features/text.npy", feats)
    (tmp_path / "items.tsv").write_text("".join(f"{i}\tItem {i}\n" for i in range(1, 7)))
    (tmp_path / "item2attributes.json").write_text(json.dumps({"5": [7], "6": [7, 8], "1": [8]}))
    return tmp_path


def test_catalogue_items_load_with_features_texts_and_attributes(tmp_path):
    ds = load_dataset(catalogue_dir(tmp_path))
    assert ds.n_items == 6
    assert ds.modalities["text"].dense.shape == (6, 8)
    assert ds.item_texts[6] == "Item 6"
    assert ds.modalities["attributes"].rows(4, 6).sum(axis=1).tolist() == [1.0, 2.0]
    st = ds.stats()
    assert st["items"] == 6 and st["items_without_interactions"] == 2


def test_popularity_ranks_every_catalogue_item(tmp_path):
    ds = load_dataset(catalogue_dir(tmp_path))
    counts = popularity_scores(ds)
    assert counts.shape == (7,) and counts[5:].tolist() == [0.0, 0.0]
    # a new item as the target: 4 interacted items (count > 0) above it, the other new item tied with it
    ranks = rank_targets(torch.ones(1, 1, dtype=torch.float64), counts[:, None], torch.tensor([5]), None)
    assert int(ranks["paper"][0]) == 4 and int(ranks["ties"]["paper"][0]) == 1  # h + t + 1 = 6 = n_items
    res = evaluate_popularity(ds)
    assert res["test"]["paper"]["users"] == 3


def test_item_hypergraph_has_rows_for_new_items(tmp_path):
    ds = load_dataset(catalogue_dir(tmp_path))
    g = build_graphs(ds, GraphConfig(knn_k=2, modalities=("text",)))
    assert g.R.shape == (3, 6)
    assert g.RT.row_nnz()[4:].tolist() == [0, 0]  # nobody interacted with items 5 and 6
    assert g.H.shape[0] == 6 and (g.H.row_nnz()[4:] > 0).all()
    # item 5's features are next to item 1's: the kNN hyperedges link them
    H = torch.zeros(g.H.shape)
    rows = torch.repeat_interleave(torch.arange(6), g.H.row_nnz().long())
    H[rows, g.H.indices.long()] = 1
    assert (H[4] * H[0]).sum() > 0


def test_catalogue_smaller_than_largest_id_is_refused(tmp_path):
    with pytest.raises(DataFormatError, match=r"catalogue\.json.*\(value: 3\)"):
        load_dataset(catalogue_dir(tmp_path, n_items=3, features_rows=3))


def test_bad_catalogue_json_is_refused(tmp_path):
    catalogue_dir(tmp_path)
    (tmp_path / "catalogue.json").write_text('{"n_items": "6"}')
    with pytest.raises(DataFormatError, match=r"catalogue\.json:1: n_items must be a positive integer"):
        load_dataset(tmp_path)


def test_without_catalogue_bigger_files_are_refused_mentioning_it(tmp_path):
    catalogue_dir(tmp_path)
    (tmp_path / "catalogue.json").unlink()
    with pytest.raises(DataFormatError, match=r"item2attributes\.json:1: unknown item.*catalogue\.json"):
        load_dataset(tmp_path)
    (tmp_path / "item2attributes.json").unlink()
    with pytest.raises(DataFormatError, match=r"feature array has 6 rows, the catalogue has 4 items.*catalogue\.json"):
        load_dataset(tmp_path)
    (tmp_path / "features/text.npy").unlink()
    with pytest.raises(DataFormatError, match=r"items\.tsv:5: unknown item.*catalogue\.json"):
        load_dataset(tmp_path)


def test_catalogue_allows_ids_beyond_the_sparse_id_limit(tmp_path):
    (tmp_path / "sequences.txt").write_text("1 1 2 3000\n")
    with pytest.raises(DataFormatError, match="far beyond"):
        load_dataset(tmp_path)
    (tmp_path / "catalogue.json").write_text('{"n_items": 5000}')
    ds = load_dataset(tmp_path)
    assert ds.n_items == 5000 and ds.stats()["items_without_interactions"] == 4997


def test_fingerprint_without_catalogue_is_unchanged_and_with_it_differs(tmp_path):
    (tmp_path / "sequences.txt").write_text("1 1 2 3\n2 2 3 1\n")
    (tmp_path / "items.tsv").write_text("1\ta\n2\tb\n3\tc\n")
    # computed by the code before catalogue.json existed: existing caches and exports stay valid
    assert load_dataset(tmp_path).fingerprint == "ba9b2e8993c50af19b1e9a3c3cc9608b7704722d1ce3329fcc824af31ddd798e"
    assert (load_dataset(tmp_path, max_len=10).fingerprint
            == "6370894d8022fd83861522fb87d377843635e8e62a8b4292d14495daac06e8ec")
    (tmp_path / "catalogue.json").write_text('{"n_items": 3}')
    ds = load_dataset(tmp_path)
    assert ds.n_items == 3 and ds.fingerprint != "ba9b2e8993c50af19b1e9a3c3cc9608b7704722d1ce3329fcc824af31ddd798e"


def run(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if cap.out.strip() else None), cap.err


INTER = ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         "7\t100\t5\t3\n7\t200\t4\t1\n7\t300\t4\t4\n8\t100\t2\t2\n8\t300\t2\t5\n8\t200\t2\t6\n")
ITEM = ("item_id:token\ttitle:token_seq\tcategories:token_seq\n"
        "100\tA Lamp\tHome Light\n200\tA Book\tBooks\n999\tNew Chair\tHome\n50\tNew Desk\tHome Office\n"
        "300\tA Pen\tOffice\n")


def test_recbole_import_keeps_items_nobody_interacted_with(tmp_path, capsys):
    (tmp_path / "x.inter").write_text(INTER)
    (tmp_path / "x.item").write_text(ITEM)
    rc, summary, err = run(capsys, "import", "--format", "recbole", "--input", str(tmp_path / "x.inter"),
                           "--item-file", str(tmp_path / "x.item"), "--keep-unseen-items",
                           "--out", str(tmp_path / "d"))
    assert rc == 0, err
    d = tmp_path / "d"
    assert summary["items"] == 3 and summary["items_without_interactions"] == 2 and summary["catalogue_items"] == 5
    assert json.loads((d / "catalogue.json").read_text()) == {"n_items": 5}
    # interacted items first (100, 200, 300), then the new ones in numeric order (50, 999)
    assert (d / "item_ids.tsv").read_text() == "1\t100\n2\t200\n3\t300\n4\t50\n5\t999\n"
    assert "4\tNew Desk\n" in (d / "items.tsv").read_text() and "5\tNew Chair\n" in (d / "items.tsv").read_text()
    names = dict(line.split("\t") for line in (d / "attribute_ids.tsv").read_text().splitlines())
    attrs = json.loads((d / "item2attributes.json").read_text())
    assert {names[str(a)] for a in attrs["4"]} == {"categories:Home", "categories:Office"}
    assert {names[str(a)] for a in attrs["5"]} == {"categories:Home"}
    ds = load_dataset(d)
    assert ds.n_items == 5 and ds.item_texts[5] == "New Chair" and ds.stats()["items_without_interactions"] == 2
    rc, st, err = run(capsys, "stats", "--data", str(d))
    assert rc == 0 and st["items"] == 5 and st["items_without_interactions"] == 2


def test_import_without_the_flag_is_unchanged(tmp_path, capsys):
    (tmp_path / "x.inter").write_text(INTER)
    (tmp_path / "x.item").write_text(ITEM)
    rc, summary, err = run(capsys, "import", "--format", "recbole", "--input", str(tmp_path / "x.inter"),
                           "--item-file", str(tmp_path / "x.item"), "--out", str(tmp_path / "d"))
    assert rc == 0, err
    assert not (tmp_path / "d/catalogue.json").exists() and load_dataset(tmp_path / "d").n_items == 3
    rc, _, err = run(capsys, "import", "--format", "recbole", "--input", str(tmp_path / "x.inter"),
                     "--keep-unseen-items", "--out", str(tmp_path / "e"))
    assert rc == 2 and "--keep-unseen-items needs an item table" in err


def test_amazon_import_keeps_new_items_but_not_filtered_ones(tmp_path, capsys):
    reviews = [("U1", "B1", 1), ("U1", "B2", 2), ("U1", "B3", 3), ("U2", "B1", 4), ("U2", "B2", 5),
               ("U2", "B3", 6), ("U3", "B9", 7)]  # U3/B9 is dropped by --k-core 2
    (tmp_path / "r.json").write_text("".join(
        json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 5.0}) + "\n" for u, a, t in reviews))
    (tmp_path / "m.json").write_text("".join(json.dumps(m) + "\n" for m in (
        {"asin": "B1", "title": "One"}, {"asin": "B9", "title": "Filtered"}, {"asin": "NEW", "title": "Brand new",
                                                                             "brand": "X"})))
    rc, summary, err = run(capsys, "import", "--format", "amazon", "--input", str(tmp_path / "r.json"),
                           "--meta", str(tmp_path / "m.json"), "--k-core", "2", "--keep-unseen-items",
                           "--out", str(tmp_path / "d"))
    assert rc == 0, err
    assert (tmp_path / "d/item_ids.tsv").read_text() == "1\tB1\n2\tB2\n3\tB3\n4\tNEW\n"
    assert (tmp_path / "d/items.tsv").read_text() == "1\tOne\n4\tBrand new\n"
    ds = load_dataset(tmp_path / "d")
    assert ds.n_items == 4 and "attributes" in ds.modalities


def test_encode_text_covers_new_items(tmp_path):
    pytest.importorskip("transformers")
    from hellm_ds.data.encode_text import EncodeTextConfig, encode_items
    from tests.data.test_encode_text import WORDS, _tiny_bert

    (tmp_path / "d").mkdir()
    root = catalogue_dir(tmp_path / "d")
    (root / "features/text.npy").unlink()
    (root / "items.tsv").write_text("".join(f"{i}\t{WORDS[i]} {WORDS[i + 1]}\n" for i in range(1, 7)))
    info = encode_items(root, EncodeTextConfig(model=str(_tiny_bert(tmp_path / "bert")), progress=False))
    assert info["n_items"] == 6 and info["items_with_text"] == 6
    ds = load_dataset(root)
    assert ds.modalities["text"].dense.shape[0] == 6 and (np.abs(ds.modalities["text"].dense[4:]).sum(1) > 0).all()
