"""Readers of raw interaction logs for ``hellm-ds import``: each turns one input format into chunks of
columns — raw user ids, raw item ids (numpy string arrays), timestamps (float64 seconds) and ratings (float64,
NaN when the input has none) — plus, for formats that have them, item titles and attributes keyed by raw item
id. ``hellm_ds.data.ids`` turns the chunks into a dataset directory.

Formats (``FORMATS``):

- ``csv``: CSV/TSV. The delimiter is given (``--delimiter``) or sniffed from the first 64 KiB (tab for a
  ``.tsv`` name). ``--columns`` names the user, item, timestamp (and optional rating) columns by header name or
  by 0-based position (default ``0,1,2``); the first row is a header when names are used, or when its
  timestamp field is not a number/date. Timestamps: numbers (any unit) or ISO-8601 dates.
- ``parquet``: the same columns by name or position, read in record batches with pyarrow (an optional extra:
  ``pip install 'hellm_ds[parquet]'``).
- ``recbole``: a RecBole atomic ``.inter`` file (header ``user_id:token<TAB>item_id:token<TAB>…``, with
  ``timestamp:float`` and optional ``rating:float``), and optionally the ``.item`` file (``--item-file``): its
  ``title`` field → ``items.tsv``, its other ``token``/``token_seq`` fields → ``item2attributes.json``.
- ``amazon``: Amazon review JSON lines (``reviewerID``, ``asin``, ``unixReviewTime``, ``overall``; gzip or
  plain) and optionally the metadata file (``--meta``; JSON or Python-literal lines, as in the 2014 dumps):
  ``title`` → ``items.tsv``, ``categories``/``category`` and ``brand`` → ``item2attributes.json``.

Every input file may start with a UTF-8 BOM. Errors are ``DataFormatError`` naming the file, line and value.
"""
from __future__ import annotations

import ast
import csv
import gzip
import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from hellm_ds.errors import DataFormatError, UsageError

FORMATS = ("csv", "parquet", "recbole", "amazon")
CHUNK = 1 << 16  # rows parsed per chunk: memory stays bounded by the chunk plus the id columns


@dataclass
class Chunk:
    users: np.ndarray  # str [n] raw user ids
    items: np.ndarray  # str [n] raw item ids
    timestamps: np.ndarray  # float64 [n]
    ratings: np.ndarray | None  # float64 [n] or None (no rating column)


@dataclass
class ItemMeta:
    """Side information keyed by raw item id: titles and attribute names."""

    titles: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, list[str]] = field(default_factory=dict)
    items: list[str] = field(default_factory=list)  # every raw item id the table lists, in file order


# ---- shared helpers ---------------------------------------------------------------------------------------
def _open_text(path: Path) -> io.TextIOBase:
    """A text stream of ``path`` (gzip detected by its magic bytes), a UTF-8 BOM dropped."""
    if not path.is_file():
        raise DataFormatError(path, None, "not a file" if path.exists() else "file not found")
    with path.open("rb") as f:
        magic = f.read(2)
    raw = gzip.open(path, "rb") if magic == b"\x1f\x8b" else path.open("rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")


def _check_ids(path: Path, first_line: int, col: list[str], what: str) -> np.ndarray:
    arr = np.array(col, dtype=str)
    empty = np.char.str_len(np.char.strip(arr)) == 0 if arr.size else np.zeros(0, bool)
    if empty.any():
        raise DataFormatError(path, first_line + int(np.argmax(empty)), f"empty {what} id", col[int(np.argmax(empty))])
    return arr


def parse_times(path: Path, first_line: int, col: list, what: str = "timestamp") -> np.ndarray:
    """Numbers (any unit) or ISO-8601 dates → float64 (dates in seconds since 1970); finite or an error."""
    try:
        out = np.array(col, dtype=np.float64)
    except (ValueError, TypeError):
        try:
            out = np.array(col, dtype="datetime64[s]").astype(np.int64).astype(np.float64)
        except (ValueError, TypeError):
            for i, v in enumerate(col):
                try:
                    float(v)
                except (ValueError, TypeError):
                    try:
                        np.datetime64(v, "s")
                    except (ValueError, TypeError):
                        raise DataFormatError(path, first_line + i, f"{what} is not a number or an ISO-8601 date",
                                              v) from None
            raise DataFormatError(path, first_line, f"{what}s mix numbers and dates") from None
    bad = ~np.isfinite(out)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataFormatError(path, first_line + i, f"{what} is not finite", col[i])
    return out


def _is_time(text: str) -> bool:
    try:
        parse_times(Path("-"), 1, [text])
        return True
    except DataFormatError:
        return False


# ---- CSV / TSV --------------------------------------------------------------------------------------------
def sniff_delimiter(path: Path) -> str:
    if path.name.lower().endswith((".tsv", ".tsv.gz", ".tab")):
        return "\t"
    with _open_text(path) as f:
        sample = f.read(1 << 16)
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;| ").delimiter
    except csv.Error:
        raise UsageError(f"cannot sniff the delimiter of {path}; pass --delimiter") from None


def parse_columns(spec: str | None) -> list[str | int]:
    """``user,item,timestamp[,rating]`` as header names or 0-based positions."""
    parts = [p.strip() for p in (spec or "0,1,2").split(",")]
    if len(parts) not in (3, 4) or not all(parts):
        raise UsageError(f"--columns takes user,item,timestamp[,rating] (names or 0-based positions), got {spec!r}")
    return [int(p) if p.isdigit() else p for p in parts]


def _resolve(path: Path, columns: list[str | int], header: list[str] | None) -> list[int]:
    out = []
    for c in columns:
        if isinstance(c, int):
            out.append(c)
        elif header is None or c not in header:
            raise DataFormatError(path, 1, f"column {c!r} not in the header", header)
        else:
            out.append(header.index(c))
    return out


def read_csv(path: str | Path, columns: list[str | int], delimiter: str | None = None,
             chunk: int = CHUNK) -> Iterator[Chunk]:
    path = Path(path)
    delim = delimiter or sniff_delimiter(path)
    if len(delim) != 1:
        raise UsageError(f"--delimiter must be one character, got {delimiter!r}")
    named = any(isinstance(c, str) for c in columns)
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delim)
        first = next(reader, None)
        if first is None:
            raise DataFormatError(path, None, "no rows in file")
        header = None
        if named:
            header = [h.strip() for h in first]
        elif len(first) > columns[2] and not _is_time(first[columns[2]].strip()):
            header = first  # positional columns, and a header row (its timestamp field is no time)
        idx = _resolve(path, columns, header)
        need = max(idx) + 1
        pending = [] if header is not None else [first]
        line = 1 if header is None else 2
        rows_iter = itertools.chain(pending, reader)
        while True:
            rows = list(itertools.islice(rows_iter, chunk))
            if not rows:
                break
            n_read = len(rows)
            line_of = None  # kept row → line, only where blank lines (csv yields []) were dropped
            if not all(rows):
                line_of = [line + k for k, r in enumerate(rows) if r]
                rows = [r for r in rows if r]
            try:
                short = [i for i, r in enumerate(rows) if len(r) < need]
                if short:
                    r = rows[short[0]]
                    raise DataFormatError(path, line + short[0], f"row has {len(r)} fields, --columns needs {need}",
                                          delim.join(r)[:80])
                cols = [[r[j] for r in rows] for j in idx]
                if rows:
                    yield Chunk(
                        users=_check_ids(path, line, cols[0], "user"),
                        items=_check_ids(path, line, cols[1], "item"),
                        timestamps=parse_times(path, line, cols[2]),
                        ratings=parse_times(path, line, cols[3], "rating") if len(cols) > 3 else None,
                    )
            except DataFormatError as e:
                if line_of is None or e.line is None:
                    raise
                raise DataFormatError(path, line_of[e.line - line], e.message,
                                      *(() if e.value is None else (e.value,))) from None
            line += n_read


# ---- Parquet ----------------------------------------------------------------------------------------------
def read_parquet(path: str | Path, columns: list[str | int], chunk: int = CHUNK) -> Iterator[Chunk]:
    path = Path(path)
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise UsageError("--format parquet needs pyarrow, an optional extra: pip install 'hellm_ds[parquet]' "
                         "(or pip install pyarrow)") from None
    if not path.is_file():
        raise DataFormatError(path, None, "not a file" if path.exists() else "file not found")
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    idx = _resolve(path, columns, names)
    if max(idx) >= len(names):
        raise DataFormatError(path, None, f"column position {max(idx)} beyond the file's {len(names)} columns")
    row = 1
    for batch in pf.iter_batches(batch_size=chunk, columns=[names[i] for i in idx]):
        cols = [batch.column(i) for i in range(batch.num_columns)]
        users = [str(x) for x in cols[0].to_pylist()]
        items = [str(x) for x in cols[1].to_pylist()]
        ts = cols[2]
        import pyarrow as pa

        if pa.types.is_timestamp(ts.type) or pa.types.is_date(ts.type):
            ts = ts.cast(pa.timestamp("s")).cast(pa.int64())
        yield Chunk(users=_check_ids(path, row, users, "user"), items=_check_ids(path, row, items, "item"),
                    timestamps=parse_times(path, row, ts.to_pylist()),
                    ratings=parse_times(path, row, cols[3].to_pylist(), "rating") if len(cols) > 3 else None)
        row += batch.num_rows


# ---- RecBole atomic files ---------------------------------------------------------------------------------
def _recbole_header(path: Path, first: list[str]) -> dict[str, tuple[int, str]]:
    out = {}
    for j, h in enumerate(first):
        name, sep, kind = h.strip().partition(":")
        if not sep:
            raise DataFormatError(path, 1, "RecBole header fields are name:type", h)
        out[name] = (j, kind)
    return out


def read_recbole_inter(path: str | Path, chunk: int = CHUNK) -> Iterator[Chunk]:
    path = Path(path)
    with _open_text(path) as f:
        first = f.readline().rstrip("\r\n").split("\t")
    fields = _recbole_header(path, first)
    for need in ("user_id", "item_id", "timestamp"):
        if need not in fields:
            raise DataFormatError(path, 1, f"the .inter header has no {need} field", "\t".join(first))
    cols: list[str | int] = [fields["user_id"][0], fields["item_id"][0], fields["timestamp"][0]]
    if "rating" in fields:
        cols.append(fields["rating"][0])
    # the header row is skipped by read_csv (its timestamp field is no time)
    yield from read_csv(path, cols, delimiter="\t", chunk=chunk)


def read_recbole_items(path: str | Path) -> ItemMeta:
    path = Path(path)
    meta = ItemMeta()
    with _open_text(path) as f:
        first = f.readline().rstrip("\r\n").split("\t")
        fields = _recbole_header(path, first)
        if "item_id" not in fields:
            raise DataFormatError(path, 1, "the .item header has no item_id field", "\t".join(first))
        key = fields["item_id"][0]
        title = next((fields[n][0] for n in ("title", "movie_title", "name") if n in fields), None)
        attrs = [(n, j, kind) for n, (j, kind) in fields.items()
                 if j not in (key, title) and kind in ("token", "token_seq")]
        for lineno, line in enumerate(f, 2):
            row = line.rstrip("\r\n").split("\t")
            if row == [""]:
                continue
            if len(row) <= key or not row[key].strip():
                raise DataFormatError(path, lineno, "row has no item_id", line.rstrip("\r\n")[:80])
            item = row[key]
            meta.items.append(item)
            if title is not None and len(row) > title and row[title].strip():
                meta.titles[item] = row[title].strip()
            names = []
            for n, j, kind in attrs:
                if len(row) > j and row[j].strip():
                    vals = row[j].split() if kind == "token_seq" else [row[j].strip()]
                    names += [f"{n}:{v}" for v in vals]
            if names:
                meta.attributes[item] = names
    return meta


# ---- Amazon reviews ---------------------------------------------------------------------------------------
def _json_line(path: Path, lineno: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        try:  # the 2014 metadata dumps are Python literals (single quotes)
            obj = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataFormatError(path, lineno, "not a JSON object", line[:80]) from None
    if not isinstance(obj, dict):
        raise DataFormatError(path, lineno, "not a JSON object", line[:80])
    return obj


def read_amazon_reviews(path: str | Path, chunk: int = CHUNK) -> Iterator[Chunk]:
    path = Path(path)
    with _open_text(path) as f:
        lineno = 0
        while True:
            users, items, times, ratings = [], [], [], []
            first = lineno + 1
            for line in itertools.islice(f, chunk):
                lineno += 1
                if not line.strip():
                    continue
                obj = _json_line(path, lineno, line)
                try:
                    users.append(str(obj["reviewerID"]))
                    items.append(str(obj["asin"]))
                    times.append(obj["unixReviewTime"])
                except KeyError as e:
                    raise DataFormatError(path, lineno, f"review has no {e.args[0]!r}", line.strip()[:80]) from None
                r = obj.get("overall")
                ratings.append(np.nan if r is None else r)
            if lineno < first:
                break
            if users:
                # per-line numbers are exact only where no blank line intervenes; errors name the chunk start
                t = parse_times(path, first, times)
                try:
                    r = np.array(ratings, dtype=np.float64)
                except (ValueError, TypeError):
                    raise DataFormatError(path, first, "an 'overall' rating in this chunk is not a number") from None
                yield Chunk(users=_check_ids(path, first, users, "reviewerID"),
                            items=_check_ids(path, first, items, "asin"), timestamps=t, ratings=r)


def _flat(x) -> list[str]:
    if isinstance(x, (list, tuple)):
        return [s for v in x for s in _flat(v)]
    return [str(x).strip()] if x is not None and str(x).strip() else []


def read_amazon_meta(path: str | Path, wanted: set[str] | None = None) -> ItemMeta:
    """``title`` → titles; ``categories`` (2014, list of lists) / ``category`` (2018) and ``brand`` →
    attributes (``category:NAME``, ``brand:NAME``). ``wanted``: keep only these asins (None: all)."""
    path = Path(path)
    meta = ItemMeta()
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = _json_line(path, lineno, line)
            asin = obj.get("asin")
            if asin is None:
                raise DataFormatError(path, lineno, "metadata line has no 'asin'", line.strip()[:80])
            asin = str(asin)
            if wanted is not None and asin not in wanted:
                continue
            meta.items.append(asin)
            title = obj.get("title")
            if isinstance(title, str) and title.strip():
                meta.titles[asin] = " ".join(title.split())  # no tabs/newlines in items.tsv
            names = [f"category:{c}" for c in _flat(obj.get("categories", obj.get("category")))]
            names += [f"brand:{b}" for b in _flat(obj.get("brand"))]
            if names:
                meta.attributes[asin] = names
    return meta
