"""Readers for the dataset-directory files. Each validates its input and raises one ``DataFormatError``
naming the file, the line and the offending value; none returns half-parsed data.

``sequences.txt`` is parsed with vectorised numpy over the raw bytes (no per-line Python), so a file of
hundreds of millions of interactions loads at memory speed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hellm_ds.errors import DataFormatError

_MAX_DIGITS = 18  # fits int64 without overflow
_MAX_ID = 10**_MAX_DIGITS - 1


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a leading UTF-8 BOM is dropped
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataFormatError(path, line, "file is not valid UTF-8", data[e.start : e.start + 8]) from None


def _plain_int(text: str) -> int | None:
    """The value of an ASCII-digits-only token (int() would also take '+1', ' 1', '1_0', Unicode digits)."""
    if 0 < len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit():
        return int(text)
    return None


@dataclass(frozen=True)
class RawSequences:
    user_ids: np.ndarray  # int64 [U], external ids in file order
    offsets: np.ndarray  # int64 [U+1] into items
    items: np.ndarray  # int64 [nnz], 1-based item ids, chronological per user
    lines: np.ndarray  # int64 [U], 1-based line of each user


def _line_of(buf: np.ndarray, pos: int) -> int:
    return int(np.count_nonzero(buf[:pos] == 10)) + 1


def _token_at(data: bytes, pos: int) -> str:
    lo = pos
    while lo > 0 and data[lo - 1 : lo] not in (b" ", b"\t", b"\n", b"\r"):
        lo -= 1
    hi = pos
    while hi < len(data) and data[hi : hi + 1] not in (b" ", b"\t", b"\n", b"\r"):
        hi += 1
    return data[lo:hi].decode("utf-8", errors="replace")


def check_dataset_dir(root: str | Path) -> Path:
    """``root`` as a Path, or a DataFormatError saying whether it is missing or not a directory (a --data
    pointing at sequences.txt itself is a common slip)."""
    root = Path(root)
    if not root.exists():
        raise DataFormatError(root, None, "dataset directory not found")
    if not root.is_dir():
        raise DataFormatError(root, None, "not a directory (--data takes the dataset directory, not a file in it)")
    return root


def read_sequences(path: str | Path) -> RawSequences:
    """Parse ``user item item ...`` lines (1-based ids, chronological). Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, None, "not a file" if path.exists() else "file not found")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM (editors on Windows write one)
        data = b"   " + data[3:]  # same length: positions and lines stay those of the file
    buf = np.frombuffer(data, dtype=np.uint8)
    is_digit = (buf >= 48) & (buf <= 57)
    is_space = (buf == 32) | (buf == 9) | (buf == 10) | (buf == 13)
    bad = ~(is_digit | is_space)
    if bad.any():
        pos = int(np.argmax(bad))
        raise DataFormatError(path, _line_of(buf, pos), "token is not a non-negative integer", _token_at(data, pos))

    digit_pos = np.flatnonzero(is_digit)
    if digit_pos.size == 0:
        raise DataFormatError(path, None, "no users in file")
    starts_mask = np.ones(digit_pos.size, dtype=bool)
    starts_mask[1:] = digit_pos[1:] != digit_pos[:-1] + 1
    tok_first = np.flatnonzero(starts_mask)  # index into digit_pos of each token's first digit
    tok_len = np.diff(np.append(tok_first, digit_pos.size))
    if tok_len.max() > _MAX_DIGITS:
        t = int(np.argmax(tok_len > _MAX_DIGITS))
        pos = int(digit_pos[tok_first[t]])
        raise DataFormatError(path, _line_of(buf, pos), "id too large", _token_at(data, pos))

    # value = sum(digit * 10^(digits after it in its token))
    tok_of_digit = np.cumsum(starts_mask) - 1
    last_of_tok = tok_first + tok_len - 1
    exponent = last_of_tok[tok_of_digit] - np.arange(digit_pos.size)
    digits = (buf[digit_pos] - 48).astype(np.int64)
    values = np.add.reduceat(digits * (10 ** exponent.astype(np.int64)), tok_first)

    newline_count = np.cumsum(buf == 10)
    tok_start = digit_pos[tok_first]
    tok_line = newline_count[tok_start]  # 0-based line of each token (a digit is never a newline)
    first_in_line = np.ones(tok_line.size, dtype=bool)
    first_in_line[1:] = tok_line[1:] != tok_line[:-1]
    user_tok = np.flatnonzero(first_in_line)
    n_tok_line = np.diff(np.append(user_tok, tok_line.size))
    lines = tok_line[user_tok] + 1
    user_ids = values[user_tok]

    problems = []  # (line, message, value): the earliest line is reported
    if (n_tok_line < 2).any():
        u = int(np.argmax(n_tok_line < 2))
        problems.append((int(lines[u]), "user has no items", int(user_ids[u])))
    if (user_ids == 0).any():
        u = int(np.argmax(user_ids == 0))
        problems.append((int(lines[u]), "user ids are 1-based; got user id 0", 0))
    item_mask = ~first_in_line
    items = values[item_mask]
    if (items == 0).any():
        t = int(np.argmax(items == 0))
        line = int(tok_line[np.flatnonzero(item_mask)[t]]) + 1
        problems.append((line, "item ids are 1-based (0 is padding); got item id 0", 0))
    order = np.argsort(user_ids, kind="stable")
    dup = np.flatnonzero(user_ids[order][1:] == user_ids[order][:-1])
    if dup.size:
        later = order[dup + 1]  # stable sort: the later occurrence of each duplicated id
        u = int(later.min())
        problems.append((int(lines[u]), "user listed twice", int(user_ids[u])))
    if problems:
        line, message, value = min(problems, key=lambda p: p[0])
        raise DataFormatError(path, line, message, value)

    offsets = np.zeros(user_ids.size + 1, dtype=np.int64)
    np.cumsum(n_tok_line - 1, out=offsets[1:])
    return RawSequences(user_ids=user_ids, offsets=offsets, items=items, lines=lines)


# Largest item id accepted for ``d`` distinct item ids: the catalogue (and every per-item array: features,
# embeddings, the model's item head) is sized by the largest id, so sparse raw ids (one id 1000000000) would
# allocate for ids nobody uses. Up to half the catalogue may be items nobody bought, plus a fixed slack.
def max_item_id(distinct: int) -> int:
    return 2 * distinct + 1000


def check_dense_item_ids(path: str | Path, raw: RawSequences, catalogue: int | None = None) -> None:
    """Refuse item ids far beyond the number of distinct items (see ``max_item_id``), naming the line. With
    a declared catalogue (``catalogue.json``) ids up to its size are legitimate."""
    top = int(raw.items.max())
    if catalogue is not None and top <= catalogue:
        return
    if top <= max_item_id(raw.items.size):  # cheap bound first: distinct ≤ nnz
        return
    distinct = int(np.unique(raw.items).size)
    limit = max_item_id(distinct)
    if top <= limit:
        return
    pos = int(np.argmax(raw.items > limit))
    user = int(np.searchsorted(raw.offsets, pos, side="right")) - 1
    raise DataFormatError(
        path, int(raw.lines[user]),
        f"item id far beyond the {distinct} distinct item ids (ids must be dense: at most 2 × distinct + 1000 "
        f"= {limit}); renumber raw ids with `hellm-ds import`", int(raw.items[pos]))


def read_catalogue(path: str | Path) -> int:
    """``catalogue.json`` = ``{"n_items": N}``: the declared catalogue size (items 1..N, some of which no
    sequence may mention yet)."""
    path = Path(path)
    text = _read_utf8(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, f"invalid JSON: {e.msg}") from None
    except RecursionError:
        raise DataFormatError(path, None, "invalid JSON: nested too deeply") from None
    if not isinstance(obj, dict) or set(obj) != {"n_items"}:
        raise DataFormatError(path, 1, 'expected {"n_items": N}', text.strip()[:80])
    n = obj["n_items"]
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= _MAX_ID:
        raise DataFormatError(path, _json_line_of_key(text, "n_items"), "n_items must be a positive integer", n)
    return n


def catalogue_size(root: Path, raw: RawSequences) -> int:
    """``n_items`` of a dataset directory: ``catalogue.json``'s N when present (refused below the largest id in
    ``sequences.txt``), else that largest id; sparse ids are refused first (``check_dense_item_ids``)."""
    top = int(raw.items.max())
    catalogue = None
    if (root / "catalogue.json").is_file():
        catalogue = read_catalogue(root / "catalogue.json")
        if catalogue < top:
            raise DataFormatError(root / "catalogue.json", None, "n_items is smaller than the largest item id "
                                  f"in sequences.txt ({top})", catalogue)
    check_dense_item_ids(root / "sequences.txt", raw, catalogue)  # before anything is sized by the largest id
    return top if catalogue is None else catalogue


_NO_CATALOGUE = " (a catalogue with items no sequence mentions yet is declared in catalogue.json)"


@dataclass(frozen=True)
class MultiHot:
    """A sparse 0/1 matrix [n_items, dim] in CSR form; row i-1 is item i."""

    indptr: np.ndarray  # int64 [n_items+1]
    indices: np.ndarray  # int64 [nnz], 0-based column
    dim: int

    def dense_rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi-1 as a dense float32 block (callers work in row blocks; never densify all)."""
        out = np.zeros((hi - lo, self.dim), dtype=np.float32)
        a, b = self.indptr[lo], self.indptr[hi]
        rows = np.repeat(np.arange(hi - lo), np.diff(self.indptr[lo : hi + 1]))
        out[rows, self.indices[a:b]] = 1.0
        return out


def _json_line_of_key(text: str, key: str, occurrence: int = 1) -> int | None:
    pos = -1
    for _ in range(occurrence):
        pos = text.find(f'"{key}"', pos + 1)
        if pos < 0:
            return None
    return text.count("\n", 0, pos) + 1


def _pairs(pairs: list) -> dict | list:
    # keep duplicate keys visible (a plain dict would silently keep the last one)
    keys = [k for k, _ in pairs]
    return dict(pairs) if len(set(keys)) == len(keys) else pairs


def read_attributes(path: str | Path, n_items: int) -> MultiHot:
    """``{"item_id": [attribute_id, ...]}`` → a multi-hot matrix; attribute ids map to dense columns in
    increasing id order. Items absent from the file get an empty row."""
    path = Path(path)
    text = _read_utf8(path)
    try:
        obj = json.loads(text, object_pairs_hook=_pairs)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, f"invalid JSON: {e.msg}") from None
    except RecursionError:
        raise DataFormatError(path, None, "invalid JSON: nested too deeply") from None
    if isinstance(obj, list) and obj and all(isinstance(p, tuple) for p in obj):  # duplicate keys (see _pairs)
        seen = set()
        for key, _ in obj:
            if key in seen:
                raise DataFormatError(path, _json_line_of_key(text, key, 2), "item listed twice", key)
            seen.add(key)
    if not isinstance(obj, dict):
        raise DataFormatError(path, 1, "expected a JSON object {item_id: [attribute_id, ...]}", type(obj).__name__)
    def fail(key: str, message: str, value: object):
        raise DataFormatError(path, _json_line_of_key(text, key), message, value)

    rows: dict[int, list[int]] = {}
    for key, attrs in obj.items():
        item = _plain_int(key)
        if item is None:
            fail(key, "item id is not a non-negative integer", key)
        if item in rows:
            fail(key, "item listed twice", key)
        if not 1 <= item <= n_items:
            fail(key, f"unknown item (the catalogue is items 1..{n_items}){_NO_CATALOGUE}", key)
        if not isinstance(attrs, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in attrs):
            fail(key, "attributes must be a list of integers", attrs)
        if any(a < 0 or a > _MAX_ID for a in attrs):
            fail(key, f"attribute ids must be in 0..{_MAX_ID}", attrs)
        rows[item] = sorted(set(attrs))
    vocab = np.unique(np.fromiter((a for v in rows.values() for a in v), dtype=np.int64))
    counts = np.zeros(n_items, dtype=np.int64)
    for item, v in rows.items():
        counts[item - 1] = len(v)
    indptr = np.zeros(n_items + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.empty(indptr[-1], dtype=np.int64)
    for item, v in rows.items():
        indices[indptr[item - 1] : indptr[item]] = np.searchsorted(vocab, v)
    return MultiHot(indptr=indptr, indices=indices, dim=int(vocab.size))


def read_feature(path: str | Path, n_items: int) -> np.ndarray:
    """A float ``[n_items, d]`` ``.npy`` (row i-1 = item i) → float32, validated finite. No pickles."""
    path = Path(path)
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises many types for corrupt headers (TokenError, TypeError, BadZipFile…)
        raise DataFormatError(path, None, f"not a readable .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive saved under a .npy name
        if hasattr(arr, "close"):
            arr.close()
        raise DataFormatError(path, None, "not a .npy array (an .npz archive?)", type(arr).__name__)
    if arr.ndim != 2:
        raise DataFormatError(path, None, "feature array must be 2-D [n_items, d]", tuple(arr.shape))
    if arr.shape[0] != n_items:
        raise DataFormatError(
            path, None, f"feature array has {arr.shape[0]} rows, the catalogue has {n_items} items"
            + (_NO_CATALOGUE if arr.shape[0] > n_items else ""), arr.shape[0]
        )
    if arr.shape[1] == 0:
        raise DataFormatError(path, None, "feature array has zero columns", tuple(arr.shape))
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataFormatError(path, None, "feature array must be floating point", str(arr.dtype))
    _check_finite(path, arr)
    if arr.dtype != np.float32:
        big = np.abs(arr) > np.finfo(np.float32).max
        if big.any():
            row, col = np.argwhere(big)[0]
            raise DataFormatError(path, int(row) + 1, f"feature does not fit float32 (row = item id, column {int(col)})",
                                  float(arr[row, col]))
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_finite(path: Path, arr: np.ndarray) -> None:
    finite = np.isfinite(arr)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise DataFormatError(path, int(row) + 1, f"non-finite feature (row = item id, column {int(col)})",
                              float(arr[row, col]))


def read_item_texts(path: str | Path, n_items: int) -> tuple[str, ...]:
    """``item_id<TAB>text`` lines → a tuple indexed by item id (entry 0 and unlisted items are "")."""
    path = Path(path)
    texts = [""] * (n_items + 1)
    seen = np.zeros(n_items + 1, dtype=bool)
    for lineno, line in enumerate(_read_utf8(path).split("\n"), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        key, sep, text = line.partition("\t")
        if not sep:
            raise DataFormatError(path, lineno, "expected item_id<TAB>text", line[:80])
        item = _plain_int(key)
        if item is None:
            raise DataFormatError(path, lineno, "item id is not a non-negative integer", key)
        if not 1 <= item <= n_items:
            raise DataFormatError(path, lineno, f"unknown item (the catalogue is items 1..{n_items}){_NO_CATALOGUE}",
                                  item)
        if seen[item]:
            raise DataFormatError(path, lineno, "item listed twice", item)
        seen[item] = True
        texts[item] = text
    return tuple(texts)
