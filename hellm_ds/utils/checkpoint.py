"""Atomic checkpoints and safetensors exports.

- ``save_state`` / ``load_state``: a training state (model, optimiser, RNG, counters) through ``torch.save``,
  read back with ``torch.load(weights_only=True)`` — no code runs on load; the write goes to a temporary
  file renamed into place, so an interrupted write never replaces the last good checkpoint.
- ``export_tensors`` / ``load_tensors``: the artefacts other stages read (safetensors + JSON metadata); an
  export refuses to overwrite a file made from a different dataset. The metadata (a JSON object under the
  header's ``"hellm"`` key) holds the caller's fields, ``"dataset"`` (the dataset fingerprint) and
  ``"payload_sha256"``: the SHA-256 of the file's tensor bytes (everything after the header), which
  ``load_tensors`` recomputes — a weight changed after the export (even a finite, well-formed one) is a
  ``DataFormatError`` naming the file and both digests. Files written before the digest existed load with a
  warning. ``hellm_ds.exports`` describes every stage's files.
"""
from __future__ import annotations

import hashlib
import json
import struct
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.utils.io import atomic_write


def save_state(path: str | Path, state: dict) -> Path:
    return atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict:
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, Exception) as e:  # a truncated zip raises several types
        raise DataFormatError(path, None, f"unreadable checkpoint ({type(e).__name__}: {e})") from None


PAYLOAD_DIGEST = "payload_sha256"  # metadata key: SHA-256 of the tensor bytes after the header
# written first, then overwritten in place by the digest (same length: the header and offsets stay valid)
_PENDING = ("pending-digest-" + "x" * 64)[:64]
_CHUNK = 1 << 22  # hashing reads 4 MiB at a time: a multi-GB export never needs a second copy in memory


def export_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict,
                   dataset_fingerprint: str, overwrite_other_dataset: bool = False) -> Path:
    """Write ``tensors`` + ``metadata`` (JSON under "hellm", with ``dataset`` and ``payload_sha256``)
    atomically; refuse to replace another dataset's."""
    path = Path(path)
    if path.exists() and not overwrite_other_dataset:
        old = read_metadata(path)
        if old.get("dataset") != dataset_fingerprint:
            raise UsageError(f"{path} was exported from another dataset ({str(old.get('dataset'))[:12]}…); "
                             "refusing to overwrite it")
    fields = {**metadata, "dataset": dataset_fingerprint, PAYLOAD_DIGEST: _PENDING}
    meta = {"hellm": json.dumps(fields, sort_keys=True, default=str)}

    def write(tmp: str) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=meta)
        _seal(Path(tmp))

    return atomic_write(path, write)


def _header_size(f, path: Path) -> int:
    """Bytes of safetensors' length prefix + JSON header, i.e. where the tensor bytes start."""
    raw = f.read(8)
    if len(raw) != 8:
        raise DataFormatError(path, None, "unreadable safetensors file (shorter than its header length)")
    return 8 + struct.unpack("<Q", raw)[0]


def _sha256_from(f, offset: int) -> str:
    f.seek(offset)
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
    return h.hexdigest()


def payload_sha256(path: str | Path) -> str:
    """SHA-256 of a safetensors file's tensor bytes (after the header), read in chunks."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _sha256_from(f, _header_size(f, path))
    except OSError as e:
        raise DataFormatError(path, None, f"unreadable safetensors file ({e})") from None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a whole file, read in chunks."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _sha256_from(f, 0)
    except OSError as e:
        raise DataFormatError(path, None, f"unreadable file ({e})") from None


def _seal(path: Path) -> None:
    """Replace the pending digest in ``path``'s header by the SHA-256 of its tensor bytes."""
    with path.open("r+b") as f:
        start = _header_size(f, path)
        header = f.read(start - 8)
        digest = _sha256_from(f, start)
        pending = _PENDING.encode()
        if header.count(pending) != 1:  # cannot happen with safetensors' JSON header; never write a wrong one
            raise RuntimeError(f"{path}: digest placeholder not found once in the safetensors header")
        f.seek(8)
        f.write(header.replace(pending, digest.encode()))


_warned_legacy: set[str] = set()


def verify_payload(path: str | Path, meta: dict | None = None) -> None:
    """Refuse ``path`` when its tensor bytes are not the ones its header's ``payload_sha256`` recorded; a file
    written before the digest existed passes with a (once per file) warning."""
    path = Path(path)
    meta = read_metadata(path) if meta is None else meta
    want = meta.get(PAYLOAD_DIGEST)
    if want is None:
        if str(path) not in _warned_legacy:
            _warned_legacy.add(str(path))
            warnings.warn(f"{path} records no {PAYLOAD_DIGEST} (written by an older hellm_ds): its weights "
                          "cannot be verified; re-export it to add one", stacklevel=3)
        return
    got = payload_sha256(path)
    if got != want:
        raise DataFormatError(path, None, f"tensor data changed since the export was written (SHA-256 "
                              f"{got}, the export recorded {want}); restore the file or re-run the stage "
                              "that wrote it")


def check_export_owner(path: str | Path, dataset_fingerprint: str) -> None:
    """Fail before training, not after it, when ``path`` holds an export made from another dataset."""
    path = Path(path)
    if path.exists() and read_metadata(path).get("dataset") != dataset_fingerprint:
        raise UsageError(f"{path} was exported from another dataset; refusing to overwrite it "
                         "(use another --out directory)")


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get("hellm", "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataFormatError(path, None, f"unreadable safetensors file ({e})") from None


def load_tensors(path: str | Path, expect: dict[str, tuple] | None = None,
                 verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of an export; ``expect`` maps names to shapes (None = any size in that dim).
    ``verify``: check the tensor bytes against the header's ``payload_sha256`` (``verify_payload``) — off only
    where the caller has just checked the whole file's SHA-256 itself."""
    path = Path(path)
    meta = read_metadata(path)
    if verify:
        verify_payload(path, meta)
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise DataFormatError(path, None, f"unreadable safetensors file ({e})") from None
    for name, shape in (expect or {}).items():
        if name not in tensors:
            raise DataFormatError(path, None, f"missing tensor {name!r}", sorted(tensors))
        got = tuple(tensors[name].shape)
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
            raise DataFormatError(path, None, f"tensor {name!r} has shape {got}, expected {shape}")
        if not torch.isfinite(tensors[name]).all():
            raise DataFormatError(path, None, f"tensor {name!r} has non-finite values")
    return tensors, meta
