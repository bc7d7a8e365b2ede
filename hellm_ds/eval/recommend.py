"""Top-k recommendations of an exported fine-tuned HeLLM for given users.

    hellm-ds recommend --checkpoint OUT --data DIR --users 1,2,3 [--k 10] [--exclude-history]
    hellm-ds recommend --checkpoint OUT --data DIR --users-file ids.txt [--batch-size 256] [--device auto]

A user's history is everything the dataset holds for them (the last ``max_len`` items, the run's
``--max-len``), so the answer is the next item after the newest one — the production question, not the
evaluation split's. Scores are ``u · Wᵀ + b`` with ``(W, b) = HeLLM.item_scoring()`` (exactly the model's item
logits), computed over item chunks with a running top-k: memory O(batch · chunk), never users × items.
``--exclude-history`` drops items the user already has (the filtered protocol); the padding item 0 is
never recommended. Output: ``{"k", "exclude_history", "users": [{"user", "items", "scores"[, "titles"]}]}``
— titles when ``DIR/items.tsv`` exists. ``--users-file``: one user id per line (blank lines and ``#``
comments skipped). An unknown user id is an error naming it (and the file's line).

Raw ids: for a dataset written by ``hellm-ds import`` (``DIR/user_ids.tsv`` and ``DIR/item_ids.tsv``, dense
id → original id) each answer also carries ``"raw_user"`` and ``"raw_items"``, and ``--raw-ids`` lets
``--users``/``--users-file`` name users by their original ids.
"""
from __future__ import annotations

from pathlib import Path

import torch

from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.eval.ranking import score_chunks


def read_user_ids(path: str | Path) -> tuple[list[int], list[int]]:
    """``(ids, line numbers)``: one integer user id per line; blank lines and ``#`` comments skipped."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read --users-file {path} ({e})") from None
    ids: list[int] = []
    lines: list[int] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        tok = line.split("#", 1)[0].strip()
        if not tok:
            continue
        try:
            ids.append(int(tok))
        except ValueError:
            raise DataFormatError(path, lineno, "not an integer user id", tok) from None
        lines.append(lineno)
    if not ids:
        raise UsageError(f"--users-file {path} lists no user ids")
    return ids, lines


def read_id_map(path: str | Path) -> list[str]:
    """``id<TAB>raw id`` lines with ids 1, 2, … in order (``hellm-ds import``'s mapping files) → a list
    indexed by dense id (entry 0 is "")."""
    path = Path(path)
    out = [""]
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(path, None, f"cannot read the id mapping ({e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        key, sep, raw = line.partition("\t")
        if not sep or key != str(len(out)):
            raise DataFormatError(path, lineno, f"expected '{len(out)}<TAB>raw id'", line[:80])
        out.append(raw)
    return out


def raw_id_maps(root: str | Path) -> tuple[list[str], list[str]] | None:
    """``(users, items)`` raw-id lists of a dataset written by ``hellm-ds import``; None without both files."""
    root = Path(root)
    if not ((root / "user_ids.tsv").is_file() and (root / "item_ids.tsv").is_file()):
        return None
    return read_id_map(root / "user_ids.tsv"), read_id_map(root / "item_ids.tsv")


def dataset_raw_id_maps(dataset) -> tuple[list[str], list[str]] | None:
    """``raw_id_maps`` of a loaded dataset's directory, checked to map every item of its sequences."""
    maps = raw_id_maps(dataset.root)
    if maps is not None and len(maps[1]) - 1 < dataset.n_items:
        raise DataFormatError(Path(dataset.root) / "item_ids.tsv", None,
                              f"maps {len(maps[1]) - 1} items, the sequences have {dataset.n_items}")
    return maps


def raw_user_id(maps, user: int) -> str | None:
    """The original id of the dataset's user id ``user`` (``sequences.txt``'s first column), or None."""
    return maps[0][user] if 0 < user < len(maps[0]) else None


def parse_user_list(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--users takes comma-separated integer ids, got {text!r}") from None
    if not ids:
        raise UsageError("--users lists no user ids")
    return ids


def top_k(user_vectors: torch.Tensor, item_vectors: torch.Tensor, item_bias: torch.Tensor | None, k: int,
          exclude: torch.Tensor | None = None, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores [B, k], item ids [B, k])`` of the best items (ids ≥ 1) by ``u · Wᵀ + b``, best first;
    ``exclude`` [B, L] item ids to skip (0 entries = padding, ignored)."""
    B = user_vectors.shape[0]
    best_s = user_vectors.new_full((B, 0), float("-inf"))
    best_i = torch.zeros(B, 0, dtype=torch.long, device=user_vectors.device)
    for lo, s in score_chunks(user_vectors, item_vectors, item_bias, chunk):
        width = s.shape[1]
        if exclude is not None:
            local = exclude - lo
            inside = (exclude > 0) & (local >= 0) & (local < width)
            rows = torch.arange(B, device=s.device)[:, None].expand_as(exclude)
            s[rows[inside], local[inside]] = float("-inf")
        ks, ki = s.topk(min(k, width), dim=1)
        best_s, order = torch.cat([best_s, ks], 1).topk(min(k, best_s.shape[1] + ks.shape[1]), dim=1)
        best_i = torch.cat([best_i, ki + lo], 1).gather(1, order)
    return best_s, best_i


def recommend(checkpoint_dir: str | Path, dataset, users: list[int], k: int = 10, exclude_history: bool = False,
              batch_size: int = 256, device: str = "auto", progress: bool = False,
              meta: dict | None = None, model=None) -> dict:
    """See the module docstring; ``dataset`` must be the run's (checked). ``model``: the export already
    loaded by ``load_checkpoint_model`` on ``device`` (not loaded again)."""
    from hellm_ds.data.batching import left_pad
    from hellm_ds.exports import load_checkpoint_model
    from hellm_ds.utils.device import resolve_device
    from hellm_ds.utils.progress import progress_bar

    if k < 1:
        raise UsageError(f"--k must be ≥ 1, got {k}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be ≥ 1, got {batch_size}")
    try:
        index = dataset.user_index(users)
    except KeyError as e:
        raise UsageError(f"{e.args[0]} (not in {dataset.root}/sequences.txt)") from None
    maps = dataset_raw_id_maps(dataset)
    dev = resolve_device(device)
    if model is None:
        model = load_checkpoint_model(checkpoint_dir, dataset, dev, meta=meta)
    W, b = (t.to(dev) for t in model.item_scoring())
    k = min(k, dataset.n_items)
    out = []
    starts, ends = dataset.offsets[index], dataset.offsets[index + 1]
    for lo in progress_bar(range(0, len(index), batch_size), desc="recommend", enabled=progress):
        hi = min(len(index), lo + batch_size)
        ids = torch.from_numpy(left_pad(dataset.items, starts[lo:hi], ends[lo:hi], dataset.max_len)).to(dev)
        batch = {"input_ids": ids, "attention_mask": (ids != 0).long()}
        with torch.no_grad():
            u = model.user_vectors(batch).float()
            s, i = top_k(u, W, b, k, exclude=ids if exclude_history else None)
        for row, user in enumerate(users[lo:hi]):
            keep = torch.isfinite(s[row])  # fewer than k items left after exclusion
            rec = {"user": int(user), "items": i[row][keep].tolist(),
                   "scores": [round(float(x), 6) for x in s[row][keep]]}
            if dataset.item_texts is not None:
                rec["titles"] = [dataset.item_texts[j] for j in rec["items"]]
            if maps is not None:
                rec["raw_user"] = raw_user_id(maps, int(user))
                rec["raw_items"] = [maps[1][j] for j in rec["items"]]
            out.append(rec)
    return {"k": k, "exclude_history": exclude_history, "users": out}


def add_cli(sub) -> None:
    from hellm_ds.utils.cli_args import device_arg

    p = sub.add_parser("recommend", help="top-k items for given users from an exported fine-tuned HeLLM",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="the fine-tuning run's --out (or a merged export)")
    p.add_argument("--data", required=True, help="the run's dataset directory")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", help="comma-separated user ids (the first column of sequences.txt)")
    who.add_argument("--users-file", help="a file with one user id per line (batch mode)")
    p.add_argument("--raw-ids", action="store_true",
                   help="--users/--users-file give original ids (DIR/user_ids.tsv of `hellm-ds import`)")
    p.add_argument("--k", type=int, default=10, help="items per user")
    p.add_argument("--exclude-history", action="store_true", help="never recommend an item the user has")
    p.add_argument("--max-len", type=int, default=None, help="history length (default: the run's)")
    p.add_argument("--batch-size", type=int, default=256, help="users scored per batch")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)


def _cmd(args) -> dict:
    from hellm_ds.exports import load_run_dataset

    if args.raw_ids:
        users, lines = _raw_users(args)
    elif args.users_file:
        users, lines = read_user_ids(args.users_file)
    else:
        users, lines = parse_user_list(args.users), None
    ds, meta = load_run_dataset(args.checkpoint, args.data, args.max_len)
    if lines is not None:  # name the file's line of an unknown id
        for user, lineno in zip(users, lines):
            try:
                ds.user_index([user])
            except KeyError:
                raise DataFormatError(args.users_file, lineno, f"user id not in {ds.root}/sequences.txt",
                                      user) from None
    return recommend(args.checkpoint, ds, users, k=args.k, exclude_history=args.exclude_history,
                     batch_size=args.batch_size, device=args.device, progress=not args.quiet, meta=meta)


def _raw_users(args) -> tuple[list[int], list[int] | None]:
    """``--raw-ids``: the given original user ids → dense ids through DIR/user_ids.tsv."""
    maps = raw_id_maps(args.data)
    if maps is None:
        raise UsageError(f"--raw-ids needs {Path(args.data) / 'user_ids.tsv'} and item_ids.tsv "
                         "(a dataset written by `hellm-ds import`)")
    dense = {raw: j for j, raw in enumerate(maps[0]) if j}
    if args.users_file:
        path = Path(args.users_file)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --users-file {path} ({e})") from None
        pairs = [(line.split("#", 1)[0].strip(), n) for n, line in enumerate(text.splitlines(), 1)]
        pairs = [(tok, n) for tok, n in pairs if tok]
        if not pairs:
            raise UsageError(f"--users-file {path} lists no user ids")
        for tok, n in pairs:
            if tok not in dense:
                raise DataFormatError(path, n, f"raw user id not in {Path(args.data) / 'user_ids.tsv'}", tok)
        return [dense[tok] for tok, _ in pairs], [n for _, n in pairs]
    toks = [t.strip() for t in args.users.split(",") if t.strip()]
    if not toks:
        raise UsageError("--users lists no user ids")
    for tok in toks:
        if tok not in dense:
            raise UsageError(f"unknown raw user id {tok!r} (not in {Path(args.data) / 'user_ids.tsv'})")
    return [dense[t] for t in toks], None
