"""Dataset readers (``hellm_ds/data/readers.py``) and ``load_dataset``: valid directories round-trip, and
every malformed input is rejected with exactly one ``DataFormatError`` naming the file, the line (or the
feature row = item id) and the offending value -- never another exception type from deep inside numpy/json.

Property tests build a valid dataset with hypothesis (random whitespace, blank lines, CRLF, missing final
newline), inject one defect at a random line and check the error's ``path``, ``line``, ``value`` and text.
Each hypothesis example gets its own temporary directory (``tmp_path`` is not reset between examples).

The last section pins corrupt inputs that once leaked other exception types (corrupt ``.npy`` headers, ids
beyond int64, non-UTF-8 files, deeply nested JSON, a JSON ``null`` value).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import string
import struct
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hellm_ds.data.dataset import load_dataset
from hellm_ds.data.readers import read_attributes, read_feature, read_item_texts, read_sequences
from hellm_ds.errors import DataFormatError

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG_MAX_LEN = 10**6
_UNSET = object()


# ---------------------------------------------------------------------------------------------------------
# A model of sequences.txt: physical lines (blank ones included), rendered to bytes
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Line:
    tokens: list[str] = field(default_factory=list)  # empty: a blank line
    seps: list[str] = field(default_factory=list)  # whitespace between tokens, len(tokens) - 1
    lead: str = ""  # leading whitespace (for a blank line: its whole content)
    trail: str = ""

    def render(self) -> str:
        out = [self.lead]
        for i, tok in enumerate(self.tokens):
            if i:
                out.append(self.seps[i - 1])
            out.append(tok)
        out.append(self.trail)
        return "".join(out)


@dataclass
class SeqDoc:
    lines: list[Line]
    endings: list[str]  # "\n" or "\r\n" per line; the last may be "" (no final newline)
    users: list[int]  # expected external ids, file order
    histories: list[list[int]]  # expected items per user

    def render(self) -> bytes:
        return "".join(ln.render() + end for ln, end in zip(self.lines, self.endings)).encode("utf-8")

    @property
    def user_line_idx(self) -> list[int]:
        """0-based index into ``lines`` of each user's line."""
        return [i for i, ln in enumerate(self.lines) if ln.tokens]

    @property
    def user_lines(self) -> list[int]:
        """1-based line number of each user (blank lines counted)."""
        return [i + 1 for i in self.user_line_idx]

    @property
    def n_items(self) -> int:
        return max(max(h) for h in self.histories)

    def with_line(self, idx: int, line: Line) -> SeqDoc:
        lines = list(self.lines)
        lines[idx] = line
        return replace(self, lines=lines)

    def with_inserted(self, idx: int, line: Line) -> SeqDoc:
        """Insert ``line`` before the existing line ``idx`` (so it becomes line idx + 1)."""
        assert 0 <= idx < len(self.lines)
        return replace(self, lines=self.lines[:idx] + [line] + self.lines[idx:],
                       endings=self.endings[:idx] + ["\n"] + self.endings[idx:])


SEP = st.sampled_from([" ", "\t", "  ", " \t", "\t\t", "   ", "\t "])
OPT_WS = st.sampled_from(["", "", "", " ", "\t", "  ", " \t ", "\t\t"])
EOL = st.sampled_from(["\n", "\n", "\r\n"])
BLANK = st.builds(lambda ws: Line(lead=ws), st.sampled_from(["", "", " ", "\t", "  \t ", "\r"]))


@st.composite
def id_token(draw, value: int) -> str:
    """The decimal token of a positive id, occasionally zero-padded ("007" is id 7)."""
    return "0" * draw(st.sampled_from([0, 0, 0, 0, 1, 2])) + str(value)


@st.composite
def seq_docs(draw, min_users: int = 1, max_users: int = 6, max_item: int = 40) -> SeqDoc:
    n = draw(st.integers(min_users, max_users))
    users = draw(st.lists(st.integers(1, 10**9), min_size=n, max_size=n, unique=True))
    histories = [draw(st.lists(st.integers(1, max_item), min_size=1, max_size=15)) for _ in users]
    lines: list[Line] = []
    for user, hist in zip(users, histories):
        lines += draw(st.lists(BLANK, max_size=2))
        tokens = [draw(id_token(user))] + [draw(id_token(i)) for i in hist]
        lines.append(Line(tokens, [draw(SEP) for _ in hist], draw(OPT_WS), draw(OPT_WS)))
    lines += draw(st.lists(BLANK, max_size=2))
    endings = [draw(EOL) for _ in lines]
    if draw(st.booleans()):
        endings[-1] = ""  # no trailing newline
    return SeqDoc(lines, endings, users, histories)


# ---------------------------------------------------------------------------------------------------------
# The optional files
# ---------------------------------------------------------------------------------------------------------
def render_attrs(entries: list[tuple[str, object]]) -> str:
    """One ``"key": value`` entry per line, so entry i (0-based) is on line i + 2."""
    body = ",\n".join(f"{json.dumps(k, ensure_ascii=False)}: {json.dumps(v)}" for k, v in entries)
    return "{\n" + body + ("\n" if entries else "") + "}\n"


@st.composite
def attr_entries(draw, n_items: int, min_size: int = 0) -> list[tuple[str, list[int]]]:
    items = draw(st.lists(st.integers(1, n_items), unique=True, min_size=min_size, max_size=min(n_items, 8)))
    return [(str(i), draw(st.lists(st.integers(0, 30), max_size=5))) for i in items]


TSV_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20)


@dataclass
class TsvDoc:
    rows: list[str | None]  # content of each physical line; None = blank line
    blanks: dict[int, str]  # content of blank lines
    endings: list[str]

    def render(self) -> bytes:
        return "".join((self.blanks.get(i, "") if r is None else r) + e
                       for i, (r, e) in enumerate(zip(self.rows, self.endings))).encode("utf-8")

    def inserted(self, idx: int, content: str) -> TsvDoc:
        """Insert a line before existing line ``idx`` (it becomes line idx + 1); idx == len appends."""
        rows = self.rows[:idx] + [content] + self.rows[idx:]
        endings = list(self.endings)
        if idx == len(self.rows) and endings and endings[-1] == "":
            endings[-1] = "\n"
        endings = endings[:idx] + ["\n"] + endings[idx:]
        blanks = {(i if i < idx else i + 1): b for i, b in self.blanks.items()}
        return TsvDoc(rows, blanks, endings)


@st.composite
def tsv_docs(draw, n_items: int, min_size: int = 0) -> tuple[TsvDoc, dict[int, str]]:
    items = draw(st.lists(st.integers(1, n_items), unique=True, min_size=min_size, max_size=min(n_items, 8)))
    texts = {i: draw(TSV_TEXT) for i in items}
    rows: list[str | None] = []
    for i in items:
        rows += [None] * draw(st.integers(0, 2))
        rows.append(f"{i}\t{texts[i]}")
    rows += [None] * draw(st.integers(0, 1))
    blanks = {k: draw(st.sampled_from(["", " ", "\t ", "  "])) for k, r in enumerate(rows) if r is None}
    endings = [draw(EOL) for _ in rows]
    if endings and draw(st.booleans()):
        endings[-1] = ""
    return TsvDoc(rows, blanks, endings), texts


@contextlib.contextmanager
def dataset_dir(seq: SeqDoc | bytes | None, *, attrs: str | bytes | None = None,
                features: dict[str, np.ndarray] | None = None, tsv: bytes | None = None):
    """A fresh dataset directory (one per hypothesis example)."""
    with tempfile.TemporaryDirectory(prefix="hellm_ds_readers_") as d:
        root = Path(d)
        if seq is not None:
            (root / "sequences.txt").write_bytes(seq if isinstance(seq, bytes) else seq.render())
        if attrs is not None:
            (root / "item2attributes.json").write_bytes(attrs if isinstance(attrs, bytes) else attrs.encode())
        if features is not None:
            (root / "features").mkdir()
            for name, arr in features.items():
                np.save(root / "features" / f"{name}.npy", arr)
        if tsv is not None:
            (root / "items.tsv").write_bytes(tsv)
        yield root


def check_error(err: DataFormatError, *, file: str, line: int | None, value: object = _UNSET) -> None:
    """The one error names the file (path ends with ``file``), the exact line and the offending value."""
    assert type(err) is DataFormatError
    want = Path(file).parts
    assert Path(err.path).parts[-len(want):] == want, err.path
    assert err.line == line, str(err)
    where = err.path if line is None else f"{err.path}:{line}"
    assert str(err).startswith(where + ": "), str(err)
    assert err.message and err.message in str(err)
    if value is not _UNSET:
        if isinstance(value, float) and math.isnan(value):
            assert isinstance(err.value, float) and math.isnan(err.value), str(err)
        else:
            assert err.value == value, str(err)
        assert f"(value: {value!r})" in str(err), str(err)


def raised(fn, *args, **kwargs) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        fn(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------------------------
# 1. Valid files round-trip
# ---------------------------------------------------------------------------------------------------------
@SETTINGS
@given(doc=seq_docs())
def test_read_sequences_roundtrip(doc):
    with dataset_dir(doc) as root:
        raw = read_sequences(root / "sequences.txt")
    assert raw.user_ids.dtype == np.int64 and raw.items.dtype == np.int64
    assert raw.offsets.dtype == np.int64 and raw.lines.dtype == np.int64
    assert raw.user_ids.tolist() == doc.users
    assert raw.offsets.tolist() == [0] + np.cumsum([len(h) for h in doc.histories]).tolist()
    assert [raw.items[a:b].tolist() for a, b in zip(raw.offsets[:-1], raw.offsets[1:])] == doc.histories
    assert raw.lines.tolist() == doc.user_lines


@SETTINGS
@given(doc=seq_docs())
def test_load_dataset_roundtrip(doc):
    with dataset_dir(doc) as root:
        ds = load_dataset(root, max_len=BIG_MAX_LEN)
    assert ds.user_ids.tolist() == doc.users
    assert ds.n_users == len(doc.users)
    assert ds.n_items == doc.n_items
    assert ds.n_interactions == sum(len(h) for h in doc.histories)
    assert [ds.history(u).tolist() for u in range(ds.n_users)] == doc.histories
    assert ds.lengths.tolist() == [len(h) for h in doc.histories]
    assert dict(ds.modalities) == {} and ds.item_texts is None
    assert ds.user_index(doc.users).tolist() == list(range(len(doc.users)))


@SETTINGS
@given(doc=seq_docs(), max_len=st.integers(3, 16))
def test_load_dataset_truncates_to_last_max_len(doc, max_len):
    with dataset_dir(doc) as root:
        ds = load_dataset(root, max_len=max_len)
    assert [ds.history(u).tolist() for u in range(ds.n_users)] == [h[-max_len:] for h in doc.histories]
    assert ds.n_interactions == sum(len(h) for h in doc.histories)
    assert ds.n_items == doc.n_items  # from the untruncated file


@SETTINGS
@given(data=st.data(), doc=seq_docs())
def test_load_dataset_roundtrip_with_all_optional_files(data, doc):
    n = doc.n_items
    entries = data.draw(attr_entries(n))
    feats = {
        "img": np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        .standard_normal((n, 3))
        .astype(np.float32),
        "txt": np.arange(n * 2, dtype=np.float64).reshape(n, 2) / 7,
    }
    tsv, texts = data.draw(tsv_docs(n))
    with dataset_dir(doc, attrs=render_attrs(entries), features=feats, tsv=tsv.render()) as root:
        ds = load_dataset(root, max_len=BIG_MAX_LEN)
    assert set(ds.modalities) == {"attributes", "img", "txt"}
    np.testing.assert_array_equal(ds.modalities["img"].dense, feats["img"])
    np.testing.assert_array_equal(ds.modalities["txt"].dense, feats["txt"].astype(np.float32))
    assert ds.modalities["txt"].dense.dtype == np.float32 and ds.modalities["txt"].dim == 2
    # attributes: multi-hot with columns = attribute ids in increasing order
    vocab = sorted({a for _, v in entries for a in v})
    want = np.zeros((n, len(vocab)), dtype=np.float32)
    for k, v in entries:
        for a in v:
            want[int(k) - 1, vocab.index(a)] = 1.0
    attrs = ds.modalities["attributes"]
    assert attrs.dim == len(vocab)
    np.testing.assert_array_equal(attrs.rows(0, n), want)
    assert ds.item_texts == tuple(texts.get(i, "") for i in range(n + 1))


# ---------------------------------------------------------------------------------------------------------
# 2a. sequences.txt: one injected defect -> DataFormatError at that line
# ---------------------------------------------------------------------------------------------------------
NON_INTEGER_TOKENS = st.one_of(
    st.sampled_from(["abc", "1.5", "3x", "x3", "\u0663", "12\u0663", "\uff11\uff12", "\u00bd", "1e5", "0x1f",
                     "+4", "1,2", "NaN", "inf", "\u221e", "4_0", "\x00", "\x0b", "\x0c7"]),
    # any token with at least one character that is not an ASCII digit (no ASCII field separators)
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=" \t\r\n"),
            min_size=1, max_size=6).filter(lambda t: not (t.isascii() and t.isdigit())),
)


@st.composite
def injection_site(draw, doc: SeqDoc, items_only: bool = False) -> tuple[int, int]:
    """(index into doc.lines of a user line, token position on it)."""
    k = draw(st.integers(0, len(doc.users) - 1))
    idx = doc.user_line_idx[k]
    n_tok = len(doc.lines[idx].tokens)
    pos = draw(st.integers(1 if items_only else 0, n_tok - 1))
    return idx, pos


def with_token(doc: SeqDoc, idx: int, pos: int, token: str) -> SeqDoc:
    line = doc.lines[idx]
    tokens = list(line.tokens)
    tokens[pos] = token
    return doc.with_line(idx, replace(line, tokens=tokens))


def seq_error(doc: SeqDoc, via_loader: bool) -> DataFormatError:
    with dataset_dir(doc) as root:
        if via_loader:
            return raised(load_dataset, root, max_len=BIG_MAX_LEN)
        return raised(read_sequences, root / "sequences.txt")


@SETTINGS
@given(data=st.data(), doc=seq_docs(), bad=NON_INTEGER_TOKENS, via_loader=st.booleans())
def test_non_integer_token_rejected(data, doc, bad, via_loader):
    idx, pos = data.draw(injection_site(doc))
    err = seq_error(with_token(doc, idx, pos, bad), via_loader)
    check_error(err, file="sequences.txt", line=idx + 1, value=bad)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), bad=NON_INTEGER_TOKENS, sep=SEP)
def test_non_integer_token_on_inserted_line_rejected(data, doc, bad, sep):
    """The defect on a new line (blank lines before it shift its number)."""
    idx = data.draw(st.integers(0, len(doc.lines) - 1))
    line = Line(["7", bad, "3"], [sep, sep], data.draw(OPT_WS), data.draw(OPT_WS))
    err = seq_error(doc.with_inserted(idx, line), via_loader=False)
    check_error(err, file="sequences.txt", line=idx + 1, value=bad)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), magnitude=st.integers(0, 10**6), via_loader=st.booleans())
def test_negative_token_rejected(data, doc, magnitude, via_loader):
    idx, pos = data.draw(injection_site(doc))
    bad = f"-{magnitude}"
    err = seq_error(with_token(doc, idx, pos, bad), via_loader)
    check_error(err, file="sequences.txt", line=idx + 1, value=bad)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), zeros=st.sampled_from(["0", "0", "00", "000"]),
       via_loader=st.booleans())
def test_item_id_zero_rejected(data, doc, zeros, via_loader):
    idx, pos = data.draw(injection_site(doc, items_only=True))
    err = seq_error(with_token(doc, idx, pos, zeros), via_loader)
    check_error(err, file="sequences.txt", line=idx + 1, value=0)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), zeros=st.sampled_from(["0", "00"]))
def test_user_id_zero_rejected(data, doc, zeros):
    k = data.draw(st.integers(0, len(doc.users) - 1))
    idx = doc.user_line_idx[k]
    err = seq_error(with_token(doc, idx, 0, zeros), via_loader=False)
    check_error(err, file="sequences.txt", line=idx + 1, value=0)


@SETTINGS
@given(data=st.data(), doc=seq_docs(min_users=2), pad=st.sampled_from(["", "", "0", "00"]),
       via_loader=st.booleans())
def test_user_listed_twice_rejected_at_second_occurrence(data, doc, pad, via_loader):
    pair = st.lists(st.integers(0, len(doc.users) - 1), min_size=2, max_size=2, unique=True)
    i, j = sorted(data.draw(pair))
    second = doc.user_line_idx[j]
    err = seq_error(with_token(doc, second, 0, pad + str(doc.users[i])), via_loader)
    check_error(err, file="sequences.txt", line=second + 1, value=doc.users[i])


@SETTINGS
@given(data=st.data(), doc=seq_docs(), via_loader=st.booleans())
def test_user_without_items_rejected(data, doc, via_loader):
    k = data.draw(st.integers(0, len(doc.users) - 1))
    idx = doc.user_line_idx[k]
    line = doc.lines[idx]
    err = seq_error(doc.with_line(idx, replace(line, tokens=line.tokens[:1], seps=[])), via_loader)
    check_error(err, file="sequences.txt", line=idx + 1, value=doc.users[k])


@SETTINGS
@given(data=st.data(), doc=seq_docs(), lone=st.integers(10**9 + 1, 10**12))
def test_inserted_user_without_items_rejected(data, doc, lone):
    idx = data.draw(st.integers(0, len(doc.lines) - 1))
    line = Line([str(lone)], [], data.draw(OPT_WS), data.draw(OPT_WS))
    err = seq_error(doc.with_inserted(idx, line), via_loader=False)
    check_error(err, file="sequences.txt", line=idx + 1, value=lone)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), digits=st.integers(19, 30))
def test_id_too_large_for_int64_rejected(data, doc, digits):
    idx, pos = data.draw(injection_site(doc))
    bad = "9" * digits
    err = seq_error(with_token(doc, idx, pos, bad), via_loader=False)
    check_error(err, file="sequences.txt", line=idx + 1, value=bad)


@SETTINGS
@given(lines=st.lists(st.sampled_from(["", " ", "\t", "  \t", "\r"]), max_size=6), eol=EOL,
       final=st.booleans(), via_loader=st.booleans())
def test_empty_or_blank_sequences_file_rejected(lines, eol, final, via_loader):
    text = eol.join(lines) + (eol if final and lines else "")
    with dataset_dir(text.encode()) as root:
        err = raised(load_dataset, root) if via_loader else raised(read_sequences, root / "sequences.txt")
    check_error(err, file="sequences.txt", line=None)


def test_missing_dataset_dir_rejected(tmp_path):
    missing = tmp_path / "no_such_dataset"
    err = raised(load_dataset, missing)
    check_error(err, file="no_such_dataset", line=None)
    assert err.path == str(missing)


def test_dataset_path_is_a_file_rejected(tmp_path):
    f = tmp_path / "sequences.txt"
    f.write_text("1 2 3\n")
    check_error(raised(load_dataset, f), file="sequences.txt", line=None)


def test_missing_sequences_file_rejected(tmp_path):
    check_error(raised(load_dataset, tmp_path), file="sequences.txt", line=None)
    check_error(raised(read_sequences, tmp_path / "sequences.txt"), file="sequences.txt", line=None)


# ---------------------------------------------------------------------------------------------------------
# 3. Nothing but DataFormatError leaks from sequences.txt, whatever the bytes
# ---------------------------------------------------------------------------------------------------------
class _Reject(Exception):
    pass


def reference_parse(data: bytes) -> tuple[list[int], list[list[int]], list[int]]:
    """The format by its definition, one Python line at a time (the oracle for the vectorised reader)."""
    if any(b not in b"0123456789 \t\r\n" for b in data):
        raise _Reject
    users, hists, lines = [], [], []
    for lineno, line in enumerate(data.decode("ascii").split("\n"), 1):
        toks = line.replace("\t", " ").replace("\r", " ").split()
        if not toks:
            continue
        if any(len(t) > 18 for t in toks):
            raise _Reject
        vals = [int(t) for t in toks]
        if len(vals) < 2 or 0 in vals or vals[0] in users:
            raise _Reject
        users.append(vals[0])
        hists.append(vals[1:])
        lines.append(lineno)
    if not users:
        raise _Reject
    return users, hists, lines


def _only_format_errors(data: bytes):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "sequences.txt"
        p.write_bytes(data)
        try:
            raw = read_sequences(p)
        except DataFormatError as e:
            assert Path(e.path).name == "sequences.txt"
            assert e.line is None or 1 <= e.line <= data.count(b"\n") + 1
            return None
    return raw


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_only_raise_data_format_error(data):
    _only_format_errors(data)


DIGITISH = st.lists(st.sampled_from(["0", "1", "2", "3", "9", "12", "007", " ", " ", "\t", "\n", "\n", "\r\n",
                                     "\r", "-", "x", "\u0663", "9" * 19]), max_size=60).map("".join)


@FUZZ
@given(text=DIGITISH)
def test_digit_soup_matches_reference_parser(text):
    """Near-valid inputs: the reader accepts exactly what the reference accepts, with the same result."""
    data = text.encode("utf-8")
    raw = _only_format_errors(data)
    try:
        want = reference_parse(data)
    except _Reject:
        assert raw is None, f"accepted invalid input {data!r}"
        return
    assert raw is not None, f"rejected valid input {data!r}"
    users, hists, lines = want
    assert raw.user_ids.tolist() == users
    assert [raw.items[a:b].tolist() for a, b in zip(raw.offsets[:-1], raw.offsets[1:])] == hists
    assert raw.lines.tolist() == lines


# ---------------------------------------------------------------------------------------------------------
# 2b. features/<name>.npy
# ---------------------------------------------------------------------------------------------------------
def feature_error(doc: SeqDoc, arrays: dict[str, np.ndarray], via_loader: bool, bad: str) -> DataFormatError:
    with dataset_dir(doc, features=arrays) as root:
        if via_loader:
            return raised(load_dataset, root, max_len=BIG_MAX_LEN)
        return raised(read_feature, root / "features" / f"{bad}.npy", doc.n_items)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), d=st.integers(1, 4), dtype=st.sampled_from([np.float32, np.float64]),
       via_loader=st.booleans())
def test_feature_wrong_row_count_rejected(data, doc, d, dtype, via_loader):
    n = doc.n_items
    rows = data.draw(st.integers(0, n + 5).filter(lambda r: r != n))
    arrays = {"a_ok": np.ones((n, 2), np.float32), "emb": np.zeros((rows, d), dtype)}
    err = feature_error(doc, arrays, via_loader, "emb")
    check_error(err, file="features/emb.npy", line=None, value=rows)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), d=st.integers(1, 4), dtype=st.sampled_from([np.float32, np.float64]),
       bad=st.sampled_from([math.nan, math.inf, -math.inf]), via_loader=st.booleans())
def test_feature_non_finite_rejected_at_item_row(data, doc, d, dtype, bad, via_loader):
    n = doc.n_items
    r = data.draw(st.integers(0, n - 1))
    c = data.draw(st.integers(0, d - 1))
    arr = np.random.default_rng(r).standard_normal((n, d)).astype(dtype)
    arr[r, c] = bad
    err = feature_error(doc, {"emb": arr, "z_ok": np.ones((n, 1), np.float32)}, via_loader, "emb")
    check_error(err, file="features/emb.npy", line=r + 1, value=bad)  # row = item id


@SETTINGS
@given(data=st.data(), doc=seq_docs(), via_loader=st.booleans())
def test_feature_not_2d_rejected(data, doc, via_loader):
    n = doc.n_items
    shape = data.draw(st.sampled_from([(), (n,), (n, 2, 2), (1, n, 3), (n, 1, 1, 1)]))
    err = feature_error(doc, {"emb": np.zeros(shape, np.float32)}, via_loader, "emb")
    check_error(err, file="features/emb.npy", line=None, value=shape)


@SETTINGS
@given(doc=seq_docs(), dtype=st.sampled_from([np.int32, np.int64, np.uint8, np.bool_, np.complex64]))
def test_feature_not_floating_point_rejected(doc, dtype):
    err = feature_error(doc, {"emb": np.zeros((doc.n_items, 2), dtype)}, True, "emb")
    check_error(err, file="features/emb.npy", line=None, value=str(np.dtype(dtype)))


@SETTINGS
@given(doc=seq_docs(), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_npy_rejected(doc, cut):
    buf = io.BytesIO()
    np.save(buf, np.ones((doc.n_items, 3), np.float32))
    blob = buf.getvalue()
    with dataset_dir(doc) as root:
        (root / "features").mkdir()
        (root / "features" / "emb.npy").write_bytes(blob[: int(cut * len(blob))])
        err = raised(load_dataset, root)
    check_error(err, file="features/emb.npy", line=None)


@SETTINGS
@given(doc=seq_docs(), data=st.binary(max_size=200))
def test_random_bytes_as_npy_only_raise_data_format_error(doc, data):
    with dataset_dir(doc) as root:
        p = root / "emb.npy"
        p.write_bytes(data)
        try:
            read_feature(p, doc.n_items)
        except DataFormatError as e:
            assert Path(e.path).name == "emb.npy"


def test_pickled_object_array_refused(tmp_path):
    p = tmp_path / "emb.npy"
    np.save(p, np.array([[object()]] * 3, dtype=object), allow_pickle=True)
    check_error(raised(read_feature, p, 3), file="emb.npy", line=None)


def test_feature_name_clashing_with_attributes_rejected():
    doc_bytes = b"1 1 2 3\n"
    clash = {"attributes": np.zeros((3, 2), np.float32)}
    with dataset_dir(doc_bytes, attrs='{"1": [0]}', features=clash) as root:
        err = raised(load_dataset, root)
    check_error(err, file="features/attributes.npy", line=None, value="attributes")


# ---------------------------------------------------------------------------------------------------------
# 2c. item2attributes.json
# ---------------------------------------------------------------------------------------------------------
def attrs_error(doc: SeqDoc, text: str | bytes, via_loader: bool) -> DataFormatError:
    with dataset_dir(doc, attrs=text) as root:
        if via_loader:
            return raised(load_dataset, root, max_len=BIG_MAX_LEN)
        return raised(read_attributes, root / "item2attributes.json", doc.n_items)


NON_INTEGER_KEYS = st.one_of(
    st.sampled_from(["abc", "1.5", "3x", "x3", "", "1e3", "0x1f", "item1", "1 2", "NaN", "\u221e", "1/2"]),
    st.text(string.ascii_letters + ".,:;!?#$%&*()[]{}<>/|~^' ", min_size=1, max_size=6),
)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), via_loader=st.booleans())
def test_attribute_unknown_item_rejected(data, doc, via_loader):
    n = doc.n_items
    entries = data.draw(attr_entries(n))
    key = str(data.draw(st.one_of(st.integers(n + 1, n + 10**6), st.integers(-10**6, 0))))
    at = data.draw(st.integers(0, len(entries)))
    entries.insert(at, (key, data.draw(st.lists(st.integers(0, 30), max_size=3))))
    err = attrs_error(doc, render_attrs(entries), via_loader)
    check_error(err, file="item2attributes.json", line=at + 2, value=key)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), key=NON_INTEGER_KEYS, via_loader=st.booleans())
def test_attribute_non_integer_key_rejected(data, doc, key, via_loader):
    entries = data.draw(attr_entries(doc.n_items))
    at = data.draw(st.integers(0, len(entries)))
    entries.insert(at, (key, [1]))
    err = attrs_error(doc, render_attrs(entries), via_loader)
    check_error(err, file="item2attributes.json", line=at + 2, value=key)


BAD_ATTR_VALUES = st.sampled_from([1, 2.0, "1", "a", True, {"a": 1}, [1.5], [True], [False, 1], ["2"], [[1]],
                                   [1, "x"], [None], [1, 2.0], {"1": [2]}])


@SETTINGS
@given(data=st.data(), doc=seq_docs(), bad=BAD_ATTR_VALUES, via_loader=st.booleans())
def test_attribute_values_not_list_of_ints_rejected(data, doc, bad, via_loader):
    entries = data.draw(attr_entries(doc.n_items, min_size=1))
    at = data.draw(st.integers(0, len(entries) - 1))
    entries[at] = (entries[at][0], bad)
    err = attrs_error(doc, render_attrs(entries), via_loader)
    check_error(err, file="item2attributes.json", line=at + 2, value=bad)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), neg=st.integers(-10**6, -1))
def test_attribute_negative_id_rejected(data, doc, neg):
    entries = data.draw(attr_entries(doc.n_items, min_size=1))
    at = data.draw(st.integers(0, len(entries) - 1))
    bad = entries[at][1] + [neg]
    entries[at] = (entries[at][0], bad)
    err = attrs_error(doc, render_attrs(entries), via_loader=False)
    check_error(err, file="item2attributes.json", line=at + 2, value=bad)


GARBAGE_JSON_LINES = st.sampled_from(
    ["@@@", "oops,", "'1': [2],", "1: [2],", '"1" [2],', "}}", "#", "[1, 2]:", "True", "{'a': 1}", "\\"]
)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), garbage=GARBAGE_JSON_LINES, via_loader=st.booleans())
def test_attribute_invalid_json_rejected_at_decoder_line(data, doc, garbage, via_loader):
    entries = data.draw(attr_entries(doc.n_items))
    lines = render_attrs(entries).split("\n")  # "{", entries..., "}", ""
    at = data.draw(st.integers(1, len(entries) + 1))  # after "{" .. before "}"
    lines.insert(at, garbage)
    err = attrs_error(doc, "\n".join(lines), via_loader)
    check_error(err, file="item2attributes.json", line=at + 1)
    assert "invalid JSON" in str(err)


@SETTINGS
@given(doc=seq_docs(), top=st.sampled_from(["[]", "[1, 2]", "1", '"x"', "null", "true"]))
def test_attribute_top_level_not_object_rejected(doc, top):
    check_error(attrs_error(doc, top + "\n", via_loader=True), file="item2attributes.json", line=1)


# a UTF-8 BOM is accepted (tests/data/test_import.py); a BOM before nothing is still empty
@pytest.mark.parametrize("text", ["", "   \n", "{", '{"1": [1]', '{"1": [1],}', "{1: [1]}", "\ufeff", "\ufeff{"])
def test_attribute_truncated_or_empty_json_rejected(text):
    with dataset_dir(b"1 1 2 3\n", attrs=text.encode("utf-8")) as root:
        err = raised(load_dataset, root)
    check_error(err, file="item2attributes.json", line=err.line)
    assert err.line is not None and err.line >= 1


# ---------------------------------------------------------------------------------------------------------
# 2d. items.tsv
# ---------------------------------------------------------------------------------------------------------
def tsv_error(doc: SeqDoc, tsv: TsvDoc, via_loader: bool) -> DataFormatError:
    with dataset_dir(doc, tsv=tsv.render()) as root:
        if via_loader:
            return raised(load_dataset, root, max_len=BIG_MAX_LEN)
        return raised(read_item_texts, root / "items.tsv", doc.n_items)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), text=TSV_TEXT, via_loader=st.booleans())
def test_items_tsv_unknown_item_rejected(data, doc, text, via_loader):
    n = doc.n_items
    tsv, _ = data.draw(tsv_docs(n))
    item = data.draw(st.one_of(st.integers(n + 1, n + 10**6), st.integers(-10**6, 0)))
    at = data.draw(st.integers(0, len(tsv.rows)))
    err = tsv_error(doc, tsv.inserted(at, f"{item}\t{text}"), via_loader)
    # a negative id is not even a well-formed id: it is named as written
    check_error(err, file="items.tsv", line=at + 1, value=item if item >= 0 else str(item))


@SETTINGS
@given(data=st.data(), doc=seq_docs(), text=TSV_TEXT, via_loader=st.booleans())
def test_items_tsv_duplicate_item_rejected_at_second_occurrence(data, doc, text, via_loader):
    tsv, texts = data.draw(tsv_docs(doc.n_items, min_size=1))
    item = data.draw(st.sampled_from(sorted(texts)))
    first = tsv.rows.index(f"{item}\t{texts[item]}")
    at = data.draw(st.integers(0, len(tsv.rows)))
    second = at + 1 if at > first else first + 2  # 1-based line of the later of the two
    err = tsv_error(doc, tsv.inserted(at, f"{item}\t{text}"), via_loader)
    check_error(err, file="items.tsv", line=second, value=item)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), sep=st.sampled_from([" ", "", "  ", ",", ";", "|"]),
       via_loader=st.booleans(),
       text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\t"), max_size=20))
def test_items_tsv_missing_tab_rejected(data, doc, sep, via_loader, text):
    tsv, _ = data.draw(tsv_docs(doc.n_items))
    content = f"{data.draw(st.integers(1, doc.n_items))}{sep}{text}"
    at = data.draw(st.integers(0, len(tsv.rows)))
    err = tsv_error(doc, tsv.inserted(at, content), via_loader)
    check_error(err, file="items.tsv", line=at + 1, value=content[:80])


@SETTINGS
@given(data=st.data(), doc=seq_docs(), text=TSV_TEXT,
       key=NON_INTEGER_KEYS.filter(lambda k: "\t" not in k and k.strip()))  # "\t" alone is a blank line
def test_items_tsv_non_integer_id_rejected(data, doc, key, text):
    tsv, _ = data.draw(tsv_docs(doc.n_items))
    at = data.draw(st.integers(0, len(tsv.rows)))
    err = tsv_error(doc, tsv.inserted(at, f"{key}\t{text}"), via_loader=False)
    check_error(err, file="items.tsv", line=at + 1, value=key)


PYTHON_INT_ONLY = ["\u0663", "12\u0663", "1_0", " 2", "2 ", "+2", "-0", "\uff12", "0" * 18 + "1"]


@pytest.mark.parametrize("key", PYTHON_INT_ONLY)
def test_attribute_key_must_be_plain_ascii_integer(tmp_path, key):
    """Keys that Python's int() takes but sequences.txt would reject are rejected here too."""
    p = tmp_path / "item2attributes.json"
    p.write_text("{\n\"1\": [0],\n" + json.dumps(key, ensure_ascii=False) + ": [1]\n}\n", encoding="utf-8")
    check_error(raised(read_attributes, p, 20), file="item2attributes.json", line=3, value=key)


@pytest.mark.parametrize("key", PYTHON_INT_ONLY)
def test_items_tsv_id_must_be_plain_ascii_integer(tmp_path, key):
    p = tmp_path / "items.tsv"
    p.write_text(f"1\tfirst\n\n{key}\ttext\n", encoding="utf-8")
    check_error(raised(read_item_texts, p, 20), file="items.tsv", line=3, value=key)


@SETTINGS
@given(data=st.data(), doc=seq_docs(), pad=st.sampled_from(["", "", "0", "00"]), via_loader=st.booleans())
def test_attribute_item_listed_twice_rejected_at_second_occurrence(data, doc, pad, via_loader):
    """The same item twice (same key, or the same id zero-padded) -- not silently merged or overwritten."""
    entries = data.draw(attr_entries(doc.n_items, min_size=1))
    src = data.draw(st.integers(0, len(entries) - 1))
    key = pad + entries[src][0]
    at = data.draw(st.integers(0, len(entries)))
    entries.insert(at, (key, data.draw(st.lists(st.integers(0, 30), max_size=3))))
    first, second = sorted([at, src if src < at else src + 1])
    err = attrs_error(doc, render_attrs(entries), via_loader)
    check_error(err, file="item2attributes.json", line=second + 2, value=entries[second][0])


# ---------------------------------------------------------------------------------------------------------
# Formerly-leaking corrupt inputs: each must now be one DataFormatError
# ---------------------------------------------------------------------------------------------------------
def _npy_with_header(header: str, n: int = 3, d: int = 2) -> bytes:
    h = header.encode("latin1")
    h += b" " * (64 - (10 + len(h) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + np.zeros((n, d), np.float32).tobytes()


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, emb=np.zeros((3, 2), np.float32))
    return buf.getvalue()


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(_npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }"),
                     id="valid-control"),
        pytest.param(_npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': ((3, 2), }"),
                     id="unbalanced-paren-header"),
        pytest.param(_npy_with_header("{'descr': '<f4', b'fortran_order': False, 'shape': (3, 2), }"),
                     id="bytes-key-header"),
        pytest.param(_npz_bytes(), id="npz-saved-as-npy"),
        pytest.param(b"PK\x03\x04" + b"\x00" * 40, id="zip-magic-garbage"),
    ],
)
def test_corrupt_npy_only_raises_data_format_error(tmp_path, blob):
    p = tmp_path / "emb.npy"
    p.write_bytes(blob)
    try:
        arr = read_feature(p, 3)
    except DataFormatError as e:
        check_error(e, file="emb.npy", line=None)
    else:
        assert arr.shape == (3, 2)


def test_attribute_id_beyond_int64_rejected(tmp_path):
    p = tmp_path / "item2attributes.json"
    p.write_text('{"1": [0],\n"2": [100000000000000000000]}\n')
    check_error(raised(read_attributes, p, 3), file="item2attributes.json", line=2)


def test_attribute_file_not_utf8_rejected(tmp_path):
    p = tmp_path / "item2attributes.json"
    p.write_bytes(b'{"1": [0],\n"2": [1]}\xff\n')
    check_error(raised(read_attributes, p, 3), file="item2attributes.json", line=2)


def test_attribute_deeply_nested_json_rejected(tmp_path):
    p = tmp_path / "item2attributes.json"
    p.write_text("[" * 100_000)
    err = raised(read_attributes, p, 3)
    assert Path(err.path).name == "item2attributes.json"


def test_items_tsv_not_utf8_rejected(tmp_path):
    p = tmp_path / "items.tsv"
    p.write_bytes(b"1\tok\n2\tbad \xff byte\n")
    check_error(raised(read_item_texts, p, 3), file="items.tsv", line=2)


def test_attribute_null_value_is_named(tmp_path):
    p = tmp_path / "item2attributes.json"
    p.write_text('{\n"1": [0],\n"2": null\n}\n')
    err = raised(read_attributes, p, 3)
    check_error(err, file="item2attributes.json", line=3)
    shown = str(err)[len(err.path):]  # the temp path itself may contain "null"
    assert "null" in shown or "None" in shown
