"""Evaluate an exported fine-tuned HeLLM (``OUT/hellm_adapter.*``, see ``hellm_ds.exports``) with the shared
full-ranking evaluator, in one plain process (no DeepSpeed)::

    hellm-ds evaluate --checkpoint OUT --data DIR [--splits valid,test] [--batch-size 256] [--device auto]

The model is factorised exactly as in training's validation: user vectors = the final hidden state of the
prompt's last position (``HeLLM.user_vectors``), item vectors and bias from ``HeLLM.item_scoring``.

Safety checks before any forward pass (``hellm_ds.exports.load_checkpoint_model``):
- the dataset must be the one the run was trained on: ``hellm_adapter.json`` records the dataset fingerprint
  (sha256 over the dataset files *and* ``max_len``) and ``n_items``; a mismatch is a ``UsageError``. The
  fingerprint depends on ``max_len``, so load the dataset with the run's ``--max-len`` (the CLI reads it from
  ``OUT/log.jsonl`` when ``--max-len`` is not given);
- an unreadable, truncated or tampered export (JSON, safetensors, a tensor file whose SHA-256 differs from
  the recorded one, wrong tensor names or shapes, non-finite weights) is a ``DataFormatError`` naming the
  file; stage-1 tables from another dataset, or not the ones the run trained with, are a ``UsageError``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from hellm_ds.errors import UsageError

SPLITS = ("valid", "test")


def evaluate_checkpoint(checkpoint_dir: str | Path, dataset, splits=SPLITS, batch_size: int = 256,
                        device: str | torch.device = "auto", progress: bool = False,
                        meta: dict | None = None, ties: str = "expected",
                        per_user: str | Path | None = None, model=None) -> dict:
    """``{"valid": {"paper": {...}, "filtered": {...}}, "test": {...}, "ties": rule}`` of the export in
    ``checkpoint_dir`` on ``dataset`` (which must be the run's; see the module docstring). ``model``: the
    export already loaded by ``load_checkpoint_model`` on ``device`` (not loaded again).

    ``per_user``: also write that file (atomically, once every split is done), one JSON line per evaluated
    user and split, sorted by (split, user): ``{"split", "user"`` (internal index), ``"user_id"`` (the
    dataset's, ``sequences.txt``'s first column), ``"target"`` (item id), ``"paper"``/``"filtered": {"above",
    "ties"}}`` — the items scored above the target and tied with it — with ``"raw_user"``/``"raw_target"``
    when the dataset has ``hellm-ds import``'s ``user_ids.tsv``/``item_ids.tsv`` and ``"title"`` with
    ``items.tsv``. ``hellm_ds.eval.metrics.per_user_metrics(above, ties, rule)`` turns them into metrics."""
    from hellm_ds.eval.evaluator import evaluate_splits
    from hellm_ds.eval.recommend import dataset_raw_id_maps, raw_user_id
    from hellm_ds.exports import load_checkpoint_model
    from hellm_ds.utils.device import resolve_device

    splits = tuple(splits)
    bad = [s for s in splits if s not in SPLITS]
    if not splits or bad:
        raise UsageError(f"splits must be a non-empty subset of {SPLITS}, got {list(splits)}")
    if batch_size < 1:
        raise UsageError(f"batch size must be ≥ 1, got {batch_size}")
    maps = dataset_raw_id_maps(dataset) if per_user is not None else None  # a bad mapping fails first
    dev = resolve_device(device)
    if model is None:
        model = load_checkpoint_model(checkpoint_dir, dataset, dev, meta=meta)
    W, b = model.item_scoring()
    rows: list[dict] = []

    def on_ranks(split: str, users, targets, ranks) -> None:
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

    out = evaluate_splits(dataset, lambda batch: model.user_vectors(batch).float(), splits=splits, ties=ties,
                          on_split_ranks=on_ranks if per_user is not None else None, item_vectors=W,
                          item_bias=b, batch_size=batch_size, device=dev, progress=progress)
    if per_user is not None:
        from hellm_ds.utils.io import atomic_write

        rows.sort(key=lambda r: (r["split"], r["user"]))
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        atomic_write(per_user, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return out
