"""Time and peak memory of ``hellm-ds import`` on synthetic CSV logs (default: 1 M and 10 M interactions).

    python launch/bench_import.py [--sizes 1000000,10000000] [--k-core 5] [--dedup] [--keep DIR]

Each log has string user and item ids (``u<n>``, ``i<n>``; Zipf-popular items, users with ~20 interactions
on average), integer timestamps and ratings, written in chunks to a temporary directory. The import runs in a
child process (``python -m hellm_ds import``); its wall time and peak resident memory (``ru_maxrss`` of that
child, from ``os.wait4``) are printed as one JSON line per size. The logs are written by another child, so this process stays
small (a fork's ru_maxrss starts at its parent's size). ``--out FILE`` also writes them as one JSON file in the
format of the other benchmarks (``hellm_ds.utils.bench.write_bench_json``: header with the command, date,
hardware, load, versions and git commit; one record per size; a summary with the seconds and peak MB per
million interactions), rewritten after each size so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("hellm_ds") is None:  # a plain checkout, not installed
    sys.path.append(str(REPO_ROOT))


def write_log(path: Path, n: int, seed: int = 0, chunk: int = 1 << 20) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    n_users, n_items = max(n // 20, 1), max(n // 50, 10)
    with path.open("w") as f:
        f.write("user,item,timestamp,rating\n")
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            u = rng.integers(0, n_users, m)
            i = np.minimum(rng.zipf(1.2, m) - 1, n_items - 1) ^ 0x5A5  # popular items spread over the ids
            t = rng.integers(1_300_000_000, 1_700_000_000, m)
            r = rng.integers(1, 6, m)
            f.write("".join(f"u{a},i{b},{c},{d}\n" for a, b, c, d in zip(u.tolist(), i.tolist(), t.tolist(),
                                                                          r.tolist())))


def summarise(records: list[dict]) -> dict:
    """Per size: import seconds and peak MB, and both per million interactions."""
    return {str(r["params"]["interactions"]): {
        "import_s": r["metrics"]["import_s"], "peak_rss_mb": r["metrics"]["peak_rss_mb"],
        "s_per_million": r["metrics"]["import_s"] / (r["params"]["interactions"] / 1e6),
        "mb_per_million": r["metrics"]["peak_rss_mb"] / (r["params"]["interactions"] / 1e6)} for r in records}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000000,10000000", help="comma-separated interaction counts")
    ap.add_argument("--k-core", type=int, default=5, help="--k-core passed to the import (default: %(default)s)")
    ap.add_argument("--dedup", action="store_true", help="pass --dedup to the import")
    ap.add_argument("--keep", default=None, help="write the logs and datasets here instead of a temp dir")
    ap.add_argument("--out", default=None, help="also write the results as one benchmark JSON file here")
    ap.add_argument("--write-log", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_log:  # the child that writes a log
        write_log(Path(args.write_log[0]), int(args.write_log[1]))
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_import."))
    root.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    header = None
    if args.out:
        import platform

        from hellm_ds.utils.bench import command_line, cpu_model

        header = {"benchmark": "import", "command": command_line(__file__, argv),
                  "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "device": cpu_model(), "device_type": "cpu", "python": platform.python_version(),
                  "threads": os.environ.get("OMP_NUM_THREADS"),
                  "config": {k: v for k, v in vars(args).items() if k != "write_log"},
                  "data": {"generator": "write_log: string ids u<n>/i<n>, n/20 users, n/50 items, Zipf(1.2) "
                                        "item popularity, seed 0"}}
    for n in (int(s) for s in args.sizes.split(",") if s):
        log = root / f"log_{n}.csv"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--write-log", str(log), str(n)], check=True)
        gen = time.perf_counter() - t0
        out = root / f"ds_{n}"
        cmd = [sys.executable, "-m", "hellm_ds", "import", "--format", "csv", "--input", str(log),
               "--columns", "user,item,timestamp,rating", "--k-core", str(args.k_core), "--out", str(out),
               "--overwrite"] + (["--dedup"] if args.dedup else [])
        t0 = time.perf_counter()
        with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
            p = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
            _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (peak RSS in KiB on Linux)
            p.returncode = os.waitstatus_to_exitcode(status)
            seconds = time.perf_counter() - t0
            out_f.seek(0)
            err_f.seek(0)
            if p.returncode != 0:
                sys.exit(f"import failed ({p.returncode}): {err_f.read().strip()}")
            summary = json.loads(out_f.read())
        peak_kib = usage.ru_maxrss
        row = {
            "interactions": n, "csv_mb": round(log.stat().st_size / 2**20, 1), "generate_s": round(gen, 1),
            "import_s": round(seconds, 1),
            "peak_rss_mb": round(peak_kib / 1024, 1),
            "users": summary["users"], "items": summary["items"], "kept": summary["interactions"],
            "dropped": summary["dropped"], "cpu_count": os.cpu_count(),
        }
        print(json.dumps(row), flush=True)
        if header is not None:
            from hellm_ds.utils.bench import write_bench_json

            records.append({"name": f"import_{n}", "params": {"interactions": n, "k_core": args.k_core,
                                                               "dedup": args.dedup},
                            "metrics": {k: v for k, v in row.items() if k not in ("interactions", "cpu_count")},
                            "status": "ok", "note": "python -m hellm_ds import in a child process; peak = "
                                                    "the child's ru_maxrss"})
            write_bench_json(args.out, header, records, summarise(records))
        if not args.keep:
            log.unlink()


if __name__ == "__main__":
    main()
