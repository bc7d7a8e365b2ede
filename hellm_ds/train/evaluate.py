"""Evaluate an exported fine-tuned HeLLM (``OUT/hellm_adapter.*`` from ``hellm_ds.train.finetune``) with the
shared full-ranking evaluator, in one plain process (no DeepSpeed)::

    hellm-ds evaluate --checkpoint OUT --data DIR [--splits valid,test] [--batch-size 256] [--device auto]

The model is factorised exactly as in training's validation: user vectors = the final hidden state of the
prompt's last position (``HeLLM.user_vectors``), item vectors and bias from ``HeLLM.item_scoring``.

Safety checks before any forward pass:
- the dataset must be the one the run was trained on: ``hellm_adapter.json`` records the dataset fingerprint
  (sha256 over the dataset files *and* ``max_len``) and ``n_items``; a mismatch is a ``UsageError``. The
  fingerprint depends on ``max_len``, so load the dataset with the run's ``--max-len`` (the CLI reads it from
  ``OUT/log.jsonl`` when ``--max-len`` is not given);
- an unreadable, truncated or tampered export (JSON, safetensors, wrong tensor names or shapes, non-finite
  weights) is a ``DataFormatError`` naming the file.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hellm_ds.errors import DataFormatError, UsageError

SPLITS = ("valid", "test")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"bad --device {device!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} requested but CUDA is not available")
    return dev


def read_adapter_meta(checkpoint_dir: str | Path) -> dict:
    """``hellm_adapter.json`` of an export, checked for the keys evaluation needs."""
    from hellm_ds.train.finetune import ADAPTER_CONFIG, ADAPTER_NAME

    ckpt = Path(checkpoint_dir)
    if not ckpt.is_dir():
        raise UsageError(f"checkpoint directory {ckpt} not found")
    path = ckpt / ADAPTER_CONFIG
    if not path.is_file() or not (ckpt / ADAPTER_NAME).is_file():
        raise UsageError(f"{ckpt} holds no export ({ADAPTER_CONFIG} + {ADAPTER_NAME}); "
                         "a finished fine-tuning run writes them at its best validation epoch")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataFormatError(path, None, f"unreadable adapter config ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise DataFormatError(path, None, "adapter config is not a JSON object")
    for key, typ in (("model", dict), ("n_items", int), ("graph_emb", str), ("seq_emb", str)):
        if not isinstance(meta.get(key), typ):
            raise DataFormatError(path, None, f"missing or malformed field {key!r}", meta.get(key))
    return meta


def check_dataset(meta: dict, dataset, checkpoint_dir: str | Path) -> None:
    """Refuse a dataset other than the run's (fingerprint, which covers max_len, and n_items)."""
    if meta["n_items"] != dataset.n_items:
        raise UsageError(f"{checkpoint_dir} was trained on {meta['n_items']} items, but {dataset.root} has "
                         f"{dataset.n_items}: not the run's dataset")
    want = meta.get("dataset")
    if want is not None and want != dataset.fingerprint:
        raise UsageError(f"{checkpoint_dir} was trained on another dataset (fingerprint {str(want)[:12]}…, "
                         f"{dataset.root} with max_len={dataset.max_len} gives "
                         f"{dataset.fingerprint[:12]}…); "
                         "the fingerprint covers the files and max_len — pass the run's --max-len")


def load_checkpoint_model(checkpoint_dir: str | Path, dataset, device: str | torch.device = "cpu",
                          meta: dict | None = None):
    """The exported model (eval mode) after the dataset and file checks; item tables from the run's paths."""
    from hellm_ds.train.finetune import ADAPTER_NAME, BASE_NAME, load_adapter
    from hellm_ds.utils.checkpoint import load_tensors, read_metadata

    ckpt = Path(checkpoint_dir)
    meta = read_adapter_meta(ckpt) if meta is None else meta
    check_dataset(meta, dataset, ckpt)
    # the safetensors export carries the same fingerprint in its header (a truncated file fails here)
    st_meta = read_metadata(ckpt / ADAPTER_NAME)
    if meta.get("dataset") is not None and st_meta.get("dataset") != meta["dataset"]:
        raise DataFormatError(ckpt / ADAPTER_NAME, None,
                              "dataset fingerprint differs from the adapter config's",
                              str(st_meta.get("dataset"))[:12])
    if meta.get("base"):
        base = ckpt / meta["base"]
        if not base.is_file():
            raise DataFormatError(base, None,
                                  f"backbone export ({BASE_NAME}) named by the adapter config is missing")
        read_metadata(base)
    rows = {"item": (dataset.n_items + 1, None)}
    graph = load_tensors(meta["graph_emb"], rows)[0]["item"].float()
    seq = load_tensors(meta["seq_emb"], rows)[0]["item"].float()
    try:
        model = load_adapter(ckpt, graph_items=graph, seq_items=seq, device=device)
    except (DataFormatError, UsageError):
        raise
    except (RuntimeError, KeyError, TypeError, ValueError) as e:  # shapes/dtypes of a tampered export
        raise DataFormatError(ckpt / ADAPTER_NAME, None, f"does not fit the model its config describes "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise DataFormatError(ckpt / ADAPTER_NAME, None, f"parameter {name!r} has non-finite values")
    return model


def load_run_dataset(checkpoint_dir: str | Path, data: str | Path, max_len: int | None = None):
    """``(dataset, meta)``: the export's ``hellm_adapter.json`` (checked first, so a missing or garbled export
    fails before the dataset is read) and the dataset loaded with the run's ``max_len`` unless one is given."""
    from hellm_ds.data.dataset import load_dataset

    meta = read_adapter_meta(checkpoint_dir)
    if max_len is None:
        max_len = run_max_len(checkpoint_dir, meta) or 50
    return load_dataset(data, max_len=max_len), meta


def evaluate_checkpoint(checkpoint_dir: str | Path, dataset, splits=SPLITS, batch_size: int = 256,
                        device: str | torch.device = "auto", progress: bool = False,
                        meta: dict | None = None, ties: str = "expected",
                        per_user: str | Path | None = None) -> dict:
    """``{"valid": {"paper": {...}, "filtered": {...}}, "test": {...}, "ties": rule}`` of the export in
    ``checkpoint_dir`` on ``dataset`` (which must be the run's; see the module docstring).

    ``per_user``: also write that file (atomically, once every split is done), one JSON line per evaluated
    user and split, sorted by (split, user): ``{"split", "user"`` (internal index), ``"user_id"`` (the
    dataset's, ``sequences.txt``'s first column), ``"target"`` (item id), ``"paper"``/``"filtered": {"above",
    "ties"}}`` — the items scored above the target and tied with it — with ``"raw_user"``/``"raw_target"``
    when the dataset has ``hellm-ds import``'s ``user_ids.tsv``/``item_ids.tsv`` and ``"title"`` with
    ``items.tsv``. ``hellm_ds.eval.metrics.per_user_metrics(above, ties, rule)`` turns them into metrics."""
    from hellm_ds.eval.evaluator import evaluate
    from hellm_ds.eval.recommend import dataset_raw_id_maps, raw_user_id

    splits = tuple(splits)
    bad = [s for s in splits if s not in SPLITS]
    if not splits or bad:
        raise UsageError(f"splits must be a non-empty subset of {SPLITS}, got {list(splits)}")
    if batch_size < 1:
        raise UsageError(f"batch size must be ≥ 1, got {batch_size}")
    maps = dataset_raw_id_maps(dataset) if per_user is not None else None  # a bad mapping fails first
    dev = resolve_device(device)
    model = load_checkpoint_model(checkpoint_dir, dataset, dev, meta=meta)
    W, b = model.item_scoring()
    rows: list[dict] = []

    def collect(split: str):
        def on_ranks(users, targets, ranks) -> None:
            protocols = [p for p in ranks if p != "ties"]
            for r, (u, t) in enumerate(zip(users.tolist(), targets.tolist())):
                uid = int(dataset.user_ids[u])
                row = {"split": split, "user": u, "user_id": uid, "target": t}
                if maps is not None:
                    row["raw_user"] = raw_user_id(maps, uid)
                    row["raw_target"] = maps[1][t]
                if dataset.item_texts is not None:
                    row["title"] = dataset.item_texts[t]
                for p in protocols:
                    row[p] = {"above": int(ranks[p][r]), "ties": int(ranks["ties"][p][r])}
                rows.append(row)
        return on_ranks if per_user is not None else None

    out = {s: evaluate(dataset, s, lambda batch: model.user_vectors(batch).float(), item_vectors=W,
                       item_bias=b, batch_size=batch_size, device=dev, progress=progress, ties=ties,
                       on_ranks=collect(s))
           for s in splits}
    if per_user is not None:
        from hellm_ds.utils.io import atomic_write

        rows.sort(key=lambda r: (r["split"], r["user"]))
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write(per_user, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return {**out, "ties": ties}


def run_max_len(checkpoint_dir: str | Path, meta: dict | None = None) -> int | None:
    """The ``--max-len`` the run trained with (``hellm_adapter.json`` — ``meta`` when already read — else its
    ``log.jsonl`` start record), or None if not recorded."""
    if meta is None:
        from hellm_ds.train.finetune import ADAPTER_CONFIG

        try:
            meta = json.loads((Path(checkpoint_dir) / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError):
            meta = {}
    v = meta.get("max_len") if isinstance(meta, dict) else None
    if isinstance(v, int):
        return v
    path = Path(checkpoint_dir) / "log.jsonl"
    if not path.is_file():
        return None
    try:
        for line in path.read_text().splitlines():
            if '"start"' not in line:
                continue
            rec = json.loads(line)
            if rec.get("event") == "start":
                v = rec.get("config", {}).get("max_len")
                return int(v) if v is not None else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return None
