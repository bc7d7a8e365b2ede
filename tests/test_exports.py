"""The export formats (``hellm_ds.exports``, ``hellm_ds.utils.checkpoint``): a fine-tuning export written by
``write_adapter`` reads back exactly; a changed byte in a weight — finite, well-formed — of the adapter, the
base or a stage-1 export is refused naming the file; a malformed ``hellm_adapter.json`` is refused alike by
``load_adapter``, ``evaluate``, ``recommend`` and ``merge-lora``; a stage-1 export of another dataset (same
shape) is refused by the fine-tuning reader; files without digests (older versions) load with a warning.
Also: one ``resolve_device``, and no import from eval/data/graph/llm up into train/pretrain."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hellm_ds.data.dataset import load_dataset
from hellm_ds.data.synth import SynthConfig, write_synthetic
from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.exports import (
    ADAPTER_CONFIG,
    ADAPTER_NAME,
    BASE_NAME,
    load_adapter,
    load_checkpoint_model,
    read_adapter_meta,
    read_item_table,
    write_adapter,
)
from hellm_ds.utils.checkpoint import (
    PAYLOAD_DIGEST,
    export_tensors,
    load_tensors,
    payload_sha256,
    read_metadata,
)

MAX_LEN = 10  # the fine-tuning history length; the `tables` fixture's stage-1 exports were made at 50


def flip_weight_byte(path: Path, tensor_offset: int = 0) -> None:
    """XOR the lowest mantissa bit of a float32 in the tensor bytes: the header stays valid, the value
    finite."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + tensor_offset] ^= 1
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def export(tables, tmp_path_factory):
    """A tiny HeLLM (config-built, scope lora: adapter + base) written by ``write_adapter`` with perturbed
    weights, so that a reload equal to it cannot come from the random initialisation."""
    from hellm_ds.llm import HeLLMConfig, build_hellm

    data, graph_path, seq_path = tables
    ds = load_dataset(data, max_len=MAX_LEN)
    cfg = HeLLMConfig(model="tiny", prefix_len=2, lora_r=4, trainable_scope="lora", item_head="linear",
                      dtype="float32")
    graph = read_item_table(graph_path, ds, ds.n_items)
    seq = read_item_table(seq_path, ds, ds.n_items)
    model = build_hellm(cfg, graph, seq, device="cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    meta = {"model": cfg.to_dict(), "n_items": ds.n_items, "graph_emb": str(Path(graph_path).resolve()),
            "seq_emb": str(Path(seq_path).resolve()), "seed": 0, "max_len": MAX_LEN, "epoch": 0,
            "base": BASE_NAME}
    out = tmp_path_factory.mktemp("exports") / "run"
    write_adapter(out, state, meta, ds.fingerprint, base=base)
    return out, ds, state, base


def _copy(export, tmp_path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(export[0], d)
    return d


def test_adapter_round_trip(export):
    out, ds, state, base = export
    meta = read_adapter_meta(out)
    assert meta["dataset"] == ds.fingerprint and meta["max_len"] == MAX_LEN and meta["base"] == BASE_NAME
    assert set(meta["sha256"]) == {ADAPTER_NAME, BASE_NAME}
    tables = {k: read_metadata(meta[k])[PAYLOAD_DIGEST] for k in ("graph_emb", "seq_emb")}
    assert meta["item_tables"] == tables
    for name in (ADAPTER_NAME, BASE_NAME):  # every tensor file also carries its payload digest
        assert read_metadata(out / name)[PAYLOAD_DIGEST] == payload_sha256(out / name)
    model = load_adapter(out)
    params = dict(model.named_parameters())
    for n, t in {**state, **base}.items():
        assert torch.equal(params[n], t), n
    # the checked path (dataset given) loads the same weights
    again = dict(load_checkpoint_model(out, ds).named_parameters())
    assert all(torch.equal(again[n], t) for n, t in state.items())


@pytest.mark.parametrize("name", [ADAPTER_NAME, BASE_NAME])
def test_changed_weight_byte_in_finetuning_export_is_refused(export, tmp_path, name):
    d = _copy(export, tmp_path)
    flip_weight_byte(d / name)
    load_tensors(d / name, verify=False)  # still a well-formed file with finite values
    for load in (lambda: load_adapter(d), lambda: load_checkpoint_model(d, export[1])):
        with pytest.raises(DataFormatError, match="changed since the export was written") as e:
            load()
        msg = str(e.value)
        assert str(d / name) in msg and json.loads((d / ADAPTER_CONFIG).read_text())["sha256"][name] in msg


def test_changed_weight_byte_in_stage1_export_is_refused(tables, tmp_path):
    ds = load_dataset(tables[0], max_len=MAX_LEN)
    path = tmp_path / "graph_embeddings.safetensors"
    shutil.copy(tables[1], path)
    want = read_metadata(path)[PAYLOAD_DIGEST]
    assert want == payload_sha256(path)
    read_item_table(path, ds, ds.n_items)  # intact: accepted
    flip_weight_byte(path, 4 * 8 * 5)  # item 5, first dimension (d = 8)
    got = payload_sha256(path)
    assert torch.isfinite(load_tensors(path, verify=False)[0]["item"]).all()
    for read in (lambda: load_tensors(path), lambda: read_item_table(path, ds, ds.n_items)):
        with pytest.raises(DataFormatError) as e:
            read()
        assert str(path) in str(e.value) and got in str(e.value) and want in str(e.value)


def test_missing_key_is_refused_by_every_reader(export, tables, tmp_path, capsys):
    from hellm_ds.cli import main
    from hellm_ds.train.merge import merge_lora

    d = _copy(export, tmp_path)
    meta = json.loads((d / ADAPTER_CONFIG).read_text())
    del meta["n_items"]
    (d / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match="'n_items'") as e:
        load_adapter(d)
    assert str(d / ADAPTER_CONFIG) in str(e.value)
    with pytest.raises(DataFormatError, match="'n_items'"):
        merge_lora(d, tmp_path / "merged")
    for cmd in (["evaluate"], ["recommend", "--users", "1"]):
        rc = main([*cmd, "--checkpoint", str(d), "--data", str(tables[0]), "--quiet", "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and str(e.value) in err and "Traceback" not in err, (cmd, err)
    meta["n_items"], meta["sha256"] = export[1].n_items, ["not", "an", "object"]  # a malformed digest record
    (d / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(DataFormatError, match="'sha256'"):
        load_adapter(d)


def test_stage1_export_of_another_dataset_is_refused(tables, tmp_path):
    ds = load_dataset(tables[0], max_len=MAX_LEN)
    other_dir = write_synthetic(tmp_path / "other", SynthConfig(users=300, items=ds.n_items, seed=8))
    other = load_dataset(other_dir)
    assert other.n_items == ds.n_items and other.fingerprint != ds.fingerprint
    table = load_tensors(tables[1])[0]["item"]
    path = export_tensors(tmp_path / "graph_embeddings.safetensors", {"item": table}, {"max_len": 50},
                          other.fingerprint)
    with pytest.raises(UsageError, match="another dataset") as e:
        read_item_table(path, ds, ds.n_items)
    msg = str(e.value)
    at50 = load_dataset(tables[0], max_len=50).fingerprint
    assert str(path) in msg and other.fingerprint in msg and at50 in msg and "re-run stage 1" in msg
    # the same files at the max_len stage 1 recorded: accepted; a recorded max_len the data does not give: not
    export_tensors(path, {"item": table}, {"max_len": 50}, at50, overwrite_other_dataset=True)
    assert torch.equal(read_item_table(path, ds, ds.n_items), table)
    export_tensors(path, {"item": table}, {"config": {"max_len": 20}}, at50, overwrite_other_dataset=True)
    with pytest.raises(UsageError, match="another dataset"):
        read_item_table(path, ds, ds.n_items)


def test_finetune_refuses_stage1_export_of_another_dataset(tables, tmp_path):
    """The trainer's own reader, before any model is built (a subprocess: it creates a process group)."""
    other = load_dataset(write_synthetic(tmp_path / "other", SynthConfig(users=300, items=150, seed=8)))
    ds = load_dataset(tables[0])
    assert other.n_items == ds.n_items
    foreign = export_tensors(tmp_path / "graph_embeddings.safetensors",
                             {"item": load_tensors(tables[1])[0]["item"]}, {}, other.fingerprint)
    cmd = [sys.executable, "-m", "hellm_ds", "finetune", "--data", str(tables[0]),
           "--graph-emb", str(foreign), "--seq-emb", str(tables[2]), "--out", str(tmp_path / "out"),
           "--model", "tiny", "--no-progress",
           "--epochs", "1", "--steps-per-epoch", "1", "--skip-eval"]  # short, should the check let it train
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(foreign) in proc.stderr and "another dataset" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_stage1_item_table_must_be_the_one_the_run_used(export, tables, tmp_path):
    d = _copy(export, tmp_path)
    meta = json.loads((d / ADAPTER_CONFIG).read_text())
    ds = export[1]
    table = load_tensors(meta["graph_emb"])[0]["item"]
    redone = export_tensors(tmp_path / "graph_embeddings.safetensors", {"item": table + 1e-3}, {},
                            load_dataset(tables[0]).fingerprint)  # stage 1 re-run: same data, other weights
    meta["graph_emb"] = str(redone)
    (d / ADAPTER_CONFIG).write_text(json.dumps(meta))
    for load in (lambda: load_adapter(d), lambda: load_checkpoint_model(d, ds)):
        with pytest.raises(UsageError, match="not the one the run trained with"):
            load()


def test_files_without_digests_load_with_a_warning(export, tables, tmp_path):
    from safetensors.torch import save_file

    d = _copy(export, tmp_path)
    meta = json.loads((d / ADAPTER_CONFIG).read_text())
    del meta["sha256"]
    (d / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="records no sha256"):
        model = load_adapter(d)
    assert all(torch.equal(dict(model.named_parameters())[n], t) for n, t in export[2].items())
    # a stage-1 export written before payload_sha256 existed
    ds = load_dataset(tables[0], max_len=MAX_LEN)
    table = load_tensors(tables[1])[0]["item"]
    old = tmp_path / "old_graph.safetensors"
    save_file({"item": table}, str(old), metadata={"hellm": json.dumps({"dataset": load_dataset(tables[0])
                                                                        .fingerprint})})
    with pytest.warns(UserWarning, match=f"records no {PAYLOAD_DIGEST}"):
        assert torch.equal(read_item_table(old, ds, ds.n_items), table)


def test_evaluate_checkpoint_is_the_per_split_evaluator(export, tmp_path):
    """``hellm-ds evaluate``'s function (through ``evaluate_splits``) gives exactly the per-split evaluator's
    numbers, per-user lines for both splits, and takes an already loaded model (the pipeline loads once)."""
    from hellm_ds.eval.checkpoint import evaluate_checkpoint
    from hellm_ds.eval.evaluator import evaluate
    from hellm_ds.eval.recommend import recommend

    out, ds = export[0], export[1]
    model = load_checkpoint_model(out, ds)
    W, b = model.item_scoring()
    want = {s: evaluate(ds, s, lambda batch: model.user_vectors(batch).float(), item_vectors=W, item_bias=b,
                        batch_size=256, progress=False) for s in ("valid", "test")}
    f = tmp_path / "per_user.jsonl"
    got = evaluate_checkpoint(out, ds, device="cpu", per_user=f)
    assert got == {**want, "ties": "expected"}
    rows = [json.loads(line) for line in f.read_text().splitlines()]
    assert [r["split"] for r in rows] == ["test"] * len(ds.split("test")) + ["valid"] * len(ds.split("valid"))
    assert evaluate_checkpoint(out, ds, splits=("test",), device="cpu", model=model)["test"] == want["test"]
    users = [int(u) for u in ds.user_ids[:3]]
    assert recommend(out, ds, users, device="cpu", model=model) == recommend(out, ds, users, device="cpu")


def test_one_resolve_device():
    from hellm_ds.utils.device import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(UsageError, match="bad --device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(UsageError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_lower_layers_never_import_the_trainers():
    """eval/, data/, graph/, llm/ and exports.py read the formats; none imports train/ or pretrain/'s
    trainers (pretrain/sasrec.py, the SASRec model definition a fused export is rebuilt with, is a model like
    llm/)."""
    root = Path(__file__).resolve().parents[1] / "hellm_ds"
    files = [root / "exports.py"]
    files += [p for d in ("eval", "data", "graph", "llm") for p in (root / d).rglob("*.py")]
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.relative_to(root)}: {n}" for n in names
                    if n.startswith(("hellm_ds.train", "hellm_ds.pretrain")) and n != "hellm_ds.pretrain.sasrec"]
    assert not bad
    assert not (root / "train" / "evaluate.py").exists()
