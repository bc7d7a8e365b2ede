"""The on-disk formats the stages hand to each other, and their one checked reader/writer.

Stage-1 exports (``hellm-ds pretrain-graph`` → ``graph_embeddings.safetensors``, ``pretrain-seq`` →
``sequential_item_embeddings.safetensors``; written by ``hellm_ds.utils.checkpoint.export_tensors``):
  safetensors with an ``item`` table [n_items + 1, d] (row = item id, row 0 padding) and, in the header's
  ``"hellm"`` JSON metadata, ``dataset`` (the fingerprint of the dataset the stage trained on: sha256 over
  its files and ``max_len``; see ``Dataset.fingerprint``), ``payload_sha256`` (SHA-256 of the tensor bytes)
  and the stage's own fields (``max_len``, ``config``, results). ``read_item_table`` checks the shape, the
  tensor bytes against ``payload_sha256``, and that the export was made from the fine-tuning dataset.

Fine-tuning exports (``hellm-ds finetune`` → its ``--out``; ``hellm-ds merge-lora`` → its ``--out``):
  - ``hellm_adapter.safetensors`` (``ADAPTER_NAME``): every trainable tensor of HeLLM under its parameter
    name (header metadata as above);
  - ``hellm_base.safetensors`` (``BASE_NAME``): the frozen backbone of a config-built model trained with
    the ``lora`` scope (random weights, not reproducible otherwise); absent otherwise;
  - ``hellm_adapter.json`` (``ADAPTER_CONFIG``): ``model`` (``HeLLMConfig.to_dict()``; ``model = "."``: the
    backbone is the export's own directory, a merged export), ``n_items``, ``graph_emb``/``seq_emb``
    (absolute paths of the stage-1 exports), ``dataset`` (fingerprint), ``base`` (file name or null),
    ``seed``, ``max_len``, ``epoch``, ``sha256`` ({file name: SHA-256 of the whole file} for the adapter and
    the base) and ``item_tables`` ({"graph_emb"/"seq_emb": the stage-1 export's ``payload_sha256``}: the
    exact tables the run trained with) and, for a run with ``--fusion sasrec``, ``fusion`` ({"sasrec_model": the
    stage-1 SASRec export, "weight": w}: the model ranks by its scores + w · that SASRec's, see
    ``HeLLM.attach_sasrec``);
  - ``results.json`` (``RESULTS_NAME``): the run's best epoch and its metrics.

What is verified on load (``read_adapter_meta``, ``load_adapter``, ``load_checkpoint_model``): the JSON's
required keys and their types; each tensor file's SHA-256 against ``sha256``; each stage-1 table against
``item_tables``; the dataset (fingerprint and ``n_items``) when one is given; tensor names, shapes and
finiteness. An export written before the digests existed (no ``sha256``/``payload_sha256``) loads with a
warning, once per file. Errors are ``DataFormatError`` (a damaged or malformed file, naming it) or
``UsageError`` (the wrong dataset or stage-1 export, naming both fingerprints).
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch

from hellm_ds.errors import DataFormatError, UsageError

ADAPTER_NAME = "hellm_adapter.safetensors"
ADAPTER_CONFIG = "hellm_adapter.json"
BASE_NAME = "hellm_base.safetensors"
RESULTS_NAME = "results.json"
ITEM_TABLE_KEYS = ("graph_emb", "seq_emb")  # adapter-config keys naming the stage-1 exports
STAGE1_DEFAULT_MAX_LEN = 50  # pretrain-graph/pretrain-seq's --max-len default

# required keys of hellm_adapter.json and their types
_REQUIRED = (("model", dict), ("n_items", int), ("graph_emb", str), ("seq_emb", str))
_warned_unverified: set[str] = set()


# ---- writing ---------------------------------------------------------------------------------------------
def write_adapter(out_dir: str | Path, state: dict[str, torch.Tensor], meta: dict, fingerprint: str,
                  base: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``out_dir``'s fine-tuning export: ``hellm_adapter.safetensors`` (``state``), ``hellm_base
    .safetensors`` when ``base`` is given, then ``hellm_adapter.json`` (``meta`` + ``dataset``, ``sha256``,
    ``item_tables``) last, so a reader never sees a config whose digests name files not yet written.
    ``meta["base"]`` names the base file; when it is set but ``base`` is None (written by an earlier export
    of the run), its digest is taken from the previous config, else hashed. Returns the config's path."""
    from hellm_ds.utils.checkpoint import PAYLOAD_DIGEST, export_tensors, file_sha256, read_metadata
    from hellm_ds.utils.io import write_json_atomic

    out = Path(out_dir)
    meta = {k: v for k, v in meta.items() if k not in ("sha256", "item_tables", "dataset")}
    if base is not None:
        meta["base"] = meta.get("base") or BASE_NAME
    digests: dict[str, str] = {}
    if base is not None:
        export_tensors(out / meta["base"], base, meta, fingerprint, overwrite_other_dataset=True)
        digests[meta["base"]] = file_sha256(out / meta["base"])
    elif meta.get("base"):
        # a multi-GB backbone written once per run: not re-hashed at every export when already recorded
        old = _previous_digests(out / ADAPTER_CONFIG).get(meta["base"])
        digests[meta["base"]] = old or file_sha256(out / meta["base"])
    export_tensors(out / ADAPTER_NAME, state, meta, fingerprint, overwrite_other_dataset=True)
    digests[ADAPTER_NAME] = file_sha256(out / ADAPTER_NAME)
    tables = {}
    for key in ITEM_TABLE_KEYS:
        if isinstance(meta.get(key), str) and Path(meta[key]).is_file():
            digest = read_metadata(meta[key]).get(PAYLOAD_DIGEST)
            if digest:
                tables[key] = digest
    return write_json_atomic(out / ADAPTER_CONFIG, {**meta, "dataset": fingerprint, "sha256": digests,
                                                    "item_tables": tables})


def _previous_digests(path: Path) -> dict:
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    sha = old.get("sha256") if isinstance(old, dict) else None
    return sha if isinstance(sha, dict) else {}


# ---- reading ---------------------------------------------------------------------------------------------
def read_adapter_meta(checkpoint_dir: str | Path) -> dict:
    """``checkpoint_dir``'s ``hellm_adapter.json``, checked: the directory and both files exist (else
    ``UsageError``), the JSON is an object with ``model`` (object), ``n_items`` (int),
    ``graph_emb``/``seq_emb`` (str) and, when present, ``base`` (str or null), ``dataset`` (str),
    ``sha256``/``item_tables`` (objects of strings) — else ``DataFormatError`` naming the file and the key."""
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
    for key, typ in _REQUIRED:
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise DataFormatError(path, None, f"missing or malformed field {key!r}", meta.get(key))
    for key, ok in (("base", lambda v: v is None or isinstance(v, str) and v),
                    ("dataset", lambda v: isinstance(v, str)),
                    ("sha256", lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values())),
                    ("item_tables", lambda v: isinstance(v, dict)
                     and all(isinstance(x, str) for x in v.values()))):
        if key in meta and not ok(meta[key]):
            raise DataFormatError(path, None, f"malformed field {key!r}", meta[key])
    return meta


def verify_adapter_files(checkpoint_dir: str | Path, meta: dict) -> bool:
    """Check the SHA-256 of the adapter (and base) file against the config's ``sha256``; a config without
    digests (an older export) passes with a warning. True when the files were verified."""
    from hellm_ds.utils.checkpoint import file_sha256

    ckpt = Path(checkpoint_dir)
    names = [ADAPTER_NAME] + ([meta["base"]] if meta.get("base") else [])
    recorded = meta.get("sha256")
    if recorded is None:
        if str(ckpt) not in _warned_unverified:
            _warned_unverified.add(str(ckpt))
            warnings.warn(f"{ckpt / ADAPTER_CONFIG} records no sha256 (written by an older hellm_ds): "
                          f"{', '.join(names)} cannot be verified", stacklevel=3)
        return False
    for name in names:
        path = ckpt / name
        if not path.is_file():
            raise DataFormatError(path, None, f"named by {ADAPTER_CONFIG} but missing")
        if name not in recorded:
            raise DataFormatError(ckpt / ADAPTER_CONFIG, None, f"'sha256' records no digest for {name}")
        got = file_sha256(path)
        if got != recorded[name]:
            raise DataFormatError(path, None, f"changed since the export was written (SHA-256 {got}, "
                                  f"{ADAPTER_CONFIG} recorded {recorded[name]}); restore it or re-export")
    return True


def read_item_table(path: str | Path, dataset_or_fingerprint, n_items: int | None = None,
                    payload_sha256: str | None = None) -> torch.Tensor:
    """The ``item`` table [n_items + 1, d] (float32) of a stage-1 export, checked: readable, tensor bytes
    matching its ``payload_sha256``, shape, finite values; then ownership:

    - ``dataset_or_fingerprint`` a ``Dataset``: the export's recorded fingerprint must be this dataset's
      files' at the ``max_len`` stage 1 ran with (its ``max_len`` / ``config.max_len``; when it records none,
      this dataset's ``max_len`` or stage 1's default 50) — stage 1 may truncate histories differently from
      fine-tuning, but must have read the same files; a string: must equal it; None: not checked;
    - ``payload_sha256`` (the adapter config's ``item_tables`` entry): the export must be the very file the
      run trained with.
    An export from another dataset is a ``UsageError`` naming the file and both fingerprints."""
    from hellm_ds.utils.checkpoint import PAYLOAD_DIGEST, load_tensors

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"stage-1 export {path} not found")
    rows = None if n_items is None else n_items + 1
    tensors, meta = load_tensors(path, {"item": (rows, None)})
    got = meta.get("dataset")
    if isinstance(dataset_or_fingerprint, str):
        if got != dataset_or_fingerprint:
            raise UsageError(f"{path} was made from another dataset (fingerprint {got}, expected "
                             f"{dataset_or_fingerprint}); re-run stage 1 on this dataset")
    elif dataset_or_fingerprint is not None:
        ds = dataset_or_fingerprint
        cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        lens = {v for v in (meta.get("max_len"), cfg.get("max_len")) if isinstance(v, int) and v >= 1}
        lens = lens or {ds.max_len, STAGE1_DEFAULT_MAX_LEN}
        if not any(ds.fingerprint_at(n) == got for n in sorted(lens)):
            want = ds.fingerprint_at(min(lens, key=lambda n: (n != ds.max_len, n)))
            raise UsageError(f"stage-1 export {path} was made from another dataset: it records fingerprint "
                             f"{got}, the fine-tuning data {ds.root} has {want} (max_len "
                             f"{'/'.join(map(str, sorted(lens)))}); re-run stage 1 (pretrain-graph / "
                             "pretrain-seq) on this dataset")
    if payload_sha256 is not None and meta.get(PAYLOAD_DIGEST) != payload_sha256:
        raise UsageError(f"stage-1 export {path} is not the one the run trained with (its tensor SHA-256 "
                         f"{meta.get(PAYLOAD_DIGEST)}, the run recorded {payload_sha256}): was stage 1 "
                         "re-run after fine-tuning? Fine-tune again, or restore the export")
    return tensors["item"].float()


def load_adapter(out_dir: str | Path, graph_items: torch.Tensor | None = None,
                 seq_items: torch.Tensor | None = None, device: str | torch.device = "cpu",
                 meta: dict | None = None):
    """HeLLM rebuilt in one plain process from ``out_dir``'s export (``hellm_adapter.*``, plus
    ``hellm_base.safetensors`` for a config-built backbone), after ``read_adapter_meta`` and the SHA-256
    checks; the item tables default to the stage-1 exports the run used (checked against ``item_tables``).
    Returns the model in eval mode."""
    from hellm_ds.llm import HeLLMConfig
    from hellm_ds.llm.model import build_hellm
    from hellm_ds.utils.checkpoint import load_tensors

    out_dir = Path(out_dir)
    meta = read_adapter_meta(out_dir) if meta is None else meta
    verified = verify_adapter_files(out_dir, meta)
    cfg = HeLLMConfig.from_dict(meta["model"])
    if cfg.model == ".":  # a merged export (merge-lora): the backbone is this directory
        cfg = dataclasses.replace(cfg, model=str(out_dir))
    tables = meta.get("item_tables") or {}
    if graph_items is None:
        graph_items = read_item_table(meta["graph_emb"], None, meta["n_items"], tables.get("graph_emb"))
    if seq_items is None:
        seq_items = read_item_table(meta["seq_emb"], None, meta["n_items"], tables.get("seq_emb"))
    # the trainer's construction: CPU dtype, backbone after seed, HeLLM's own parts after seed + 1
    model = build_hellm(cfg, graph_items, seq_items, device="cpu", seed=meta.get("seed", 0))
    fusion = meta.get("fusion")
    params = dict(model.named_parameters())
    if meta.get("base"):
        base, _ = load_tensors(out_dir / meta["base"], verify=not verified)
        with torch.no_grad():
            for n, t in base.items():
                params[n].copy_(t)
    state, _ = load_tensors(out_dir / ADAPTER_NAME, verify=not verified)
    model.load_trainable_state_dict(state)
    if fusion:  # ranked with the stage-1 SASRec's scores added at the weight picked on validation
        from hellm_ds.pretrain.sasrec import sasrec_from_export  # a model definition, not a trainer

        if not isinstance(fusion, dict) or not isinstance(fusion.get("sasrec_model"), str) \
                or not isinstance(fusion.get("weight"), (int, float)):
            raise DataFormatError(out_dir / ADAPTER_CONFIG, None, "'fusion' needs 'sasrec_model' (a path) and "
                                  "'weight' (a number)", fusion)
        sasrec, _ = sasrec_from_export(fusion["sasrec_model"])
        model.attach_sasrec(sasrec, fusion["weight"])
    return model.to(device).eval()


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
    """The exported model (eval mode) after the dataset and file checks; item tables from the run's paths,
    checked against ``dataset`` and the run's record of them."""
    from hellm_ds.utils.checkpoint import read_metadata

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
    tables = meta.get("item_tables") or {}
    graph = read_item_table(meta["graph_emb"], dataset, dataset.n_items, tables.get("graph_emb"))
    seq = read_item_table(meta["seq_emb"], dataset, dataset.n_items, tables.get("seq_emb"))
    try:
        model = load_adapter(ckpt, graph_items=graph, seq_items=seq, device=device, meta=meta)
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
    """``(dataset, meta)``: the export's ``hellm_adapter.json`` (checked first, so a missing or garbled
    export fails before the dataset is read) and the dataset loaded with the run's ``max_len`` unless one is
    given."""
    from hellm_ds.data.dataset import load_dataset

    meta = read_adapter_meta(checkpoint_dir)
    if max_len is None:
        max_len = run_max_len(checkpoint_dir, meta) or 50
    return load_dataset(data, max_len=max_len), meta


def run_max_len(checkpoint_dir: str | Path, meta: dict | None = None) -> int | None:
    """The ``--max-len`` the run trained with (``hellm_adapter.json`` — ``meta`` when already read — else its
    ``log.jsonl`` start record), or None if not recorded."""
    if meta is None:
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
