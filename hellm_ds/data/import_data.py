"""``hellm-ds import``: your own interaction log → a dataset directory (see ``hellm_ds.data.importers`` for
the formats and ``hellm_ds.data.ids`` for ids, filters and the files written).

    hellm-ds import --format csv --input log.csv [--columns user,item,timestamp[,rating]] --out DIR
    hellm-ds import --format recbole --input x.inter [--item-file x.item] --out DIR
    hellm-ds import --format amazon --input reviews.json.gz [--meta meta.json.gz] --k-core 5 --out DIR
    ... [--keep-unseen-items]   the item table's items nobody interacted with join the catalogue (catalogue.json)

Prints the summary JSON (users, items, interactions, what each filter dropped), also kept in DIR/import.json.
"""
from __future__ import annotations

from pathlib import Path

from hellm_ds.errors import UsageError

HELP = "import a CSV/TSV, Parquet, RecBole or Amazon-review log into a dataset directory (dense ids)"


def run(args) -> dict:
    from hellm_ds.data import importers as imp
    from hellm_ds.data.ids import import_log

    fmt = args.format
    if args.meta and fmt != "amazon":
        raise UsageError("--meta is for --format amazon (RecBole's item file: --item-file)")
    if args.item_file and fmt != "recbole":
        raise UsageError("--item-file is for --format recbole (Amazon metadata: --meta)")
    if args.columns and fmt not in ("csv", "parquet"):
        raise UsageError(f"--columns is for --format csv or parquet; {fmt} names its own columns")
    if args.delimiter and fmt != "csv":
        raise UsageError("--delimiter is for --format csv")
    delimiter = {"\\t": "\t", "tab": "\t"}.get(args.delimiter, args.delimiter) if args.delimiter else None
    path = Path(args.input)
    meta_loader = None
    if fmt == "csv":
        chunks = imp.read_csv(path, imp.parse_columns(args.columns), delimiter=delimiter)
    elif fmt == "parquet":
        chunks = imp.read_parquet(path, imp.parse_columns(args.columns))
    elif fmt == "recbole":
        chunks = imp.read_recbole_inter(path)
        if args.item_file:
            meta_loader = lambda kept: imp.read_recbole_items(Path(args.item_file))  # noqa: E731
    else:
        chunks = imp.read_amazon_reviews(path)
        if args.meta:
            meta_loader = lambda kept: imp.read_amazon_meta(Path(args.meta), wanted=kept)  # noqa: E731
    if args.keep_unseen_items and meta_loader is None:
        raise UsageError("--keep-unseen-items needs an item table: --item-file (recbole) or --meta (amazon)")
    source = {"format": fmt, "input": str(path)}
    return import_log(chunks, args.out, meta_loader=meta_loader, min_rating=args.min_rating, dedup=args.dedup,
                      k=args.k_core, overwrite=args.overwrite, source=source, keep_unseen=args.keep_unseen_items)


def add_cli(sub) -> None:
    from hellm_ds.data.importers import FORMATS

    p = sub.add_parser("import", help=HELP,
                       description="Your own interaction log → a dataset directory: dense 1-based ids with "
                       "user_ids.tsv/item_ids.tsv mapping files, chronological sequences, optional rating "
                       "threshold, de-duplication and k-core; prints the summary JSON (also DIR/import.json).")
    p.add_argument("--format", required=True, choices=FORMATS, help="input format")
    p.add_argument("--input", required=True, help="the interaction file (csv/tsv, .parquet, .inter, reviews JSON)")
    p.add_argument("--meta", default=None, help="amazon: the metadata JSON-lines file (titles, categories, brand)")
    p.add_argument("--item-file", default=None, help="recbole: the .item atomic file (title, attributes)")
    p.add_argument("--delimiter", default=None, help="csv: field delimiter (default: sniffed; '\\t' or tab for TSV)")
    p.add_argument("--columns", default=None,
                   help="csv/parquet: user,item,timestamp[,rating] as header names or 0-based positions "
                   "(default: 0,1,2)")
    p.add_argument("--min-rating", type=float, default=None, help="keep interactions rated ≥ X (default: all)")
    p.add_argument("--dedup", action="store_true", help="keep only the earliest of repeated (user, item) pairs")
    p.add_argument("--k-core", type=int, default=0,
                   help="iteratively keep users and items with ≥ K interactions (default: %(default)s = off)")
    p.add_argument("--keep-unseen-items", action="store_true",
                   help="recbole --item-file / amazon --meta: items the table lists but no interaction mentions "
                   "(new items) join the catalogue after the others, ranked like them; writes catalogue.json")
    p.add_argument("--out", required=True, help="dataset directory to write (absent or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty directory")
    p.set_defaults(func=run)
