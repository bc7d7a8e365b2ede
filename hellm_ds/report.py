"""``hellm-ds report`` — the README's results tables, generated from the committed result files.

    hellm-ds report [--results results] [--readme README.md] [--check]

Each row of a results table is one file ``results/<dataset>/<model>.json`` written by a script of
``launch/reproduce/`` (the exact commands, seeds and budgets; see ``launch/reproduce/README.md``) in this
format::

    {"dataset": "scientific", "model": "sasrec", "label": "SASRec (d 64, 2 blocks)", "order": 20,
     "script": "launch/reproduce/scientific.sh", "command": "hellm-ds pipeline …",
     "runs": [{"seed": 0, "seconds": 38.2, "best_epoch": 14, "epochs_run": 19,
               "test": {"expected": {"paper": {"Recall@10": …, …, "mean_ties": …}, "filtered": {…}},
                        "optimistic": {…}},
               "valid": {…}}, …],
     "environment": {"date": …, "git_commit": …, "hardware": {…}, "versions": {…}}}

A cell is the mean over seeds ± the sample standard deviation (shown with two or more seeds), paper /
filtered protocol, under the tie-aware ``expected`` rule (the files keep both rules). The tables replace
what lies between ``<!-- results:DATASET:begin -->`` and ``<!-- results:DATASET:end -->`` in the README;
``--check`` changes nothing and exits 1 when the README differs from what the files generate (a test runs
it). Standard library only.

The Benchmarks table (between ``<!-- results:bench:begin -->`` and ``<!-- results:bench:end -->``) is
generated the same way from ``results/bench/*.json``: each file is what a ``launch/bench_*.py`` script wrote
with ``--out`` (``hellm_ds.utils.bench.write_bench_json``: ``benchmark``, ``command``, ``environment`` with
date, hardware, load, versions and git commit, ``results``, ``summary``), one row each, its figures and the
ratios against the baseline the same run measured. ``results/bench/gpu_check.json`` is the summary of
``launch/gpu_check.sh`` (``write_gpu_summary``; one row per step); until a GPU run has produced one, a single
row says the GPU figures are pending.
"""
from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.utils.io import atomic_write

COLUMNS = ("Recall@10", "NDCG@10", "Recall@20", "NDCG@20")
PROTOCOLS = ("paper", "filtered")
RULE = "expected"
MARKER = re.compile(r"<!-- results:([\w.-]+):begin -->\n.*?<!-- results:\1:end -->", re.S)
BENCH = "bench"  # results/bench/: benchmark files, not a dataset's rows
GPU_CHECK = "gpu_check.json"
GPU_PENDING = "GPU figures pending: no GPU lent yet (`launch/gpu_check.sh`)"


def load_results(root: str | Path) -> dict[str, list[dict]]:
    """``{dataset: [result, …]}`` ordered by each file's ``order``, then model name."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"results directory not found: {root}")
    out: dict[str, list[dict]] = {}
    for path in sorted(root.glob("*/*.json")):
        if path.parent.name == BENCH:
            continue
        try:
            res = json.loads(path.read_text())
        except ValueError as e:
            raise DataFormatError(path, getattr(e, "lineno", None), "not valid JSON", str(e)) from None
        for key in ("dataset", "model", "label", "runs"):
            if key not in res:
                raise DataFormatError(path, None, f"missing key {key!r}", sorted(res))
        if res["dataset"] != path.parent.name or res["model"] != path.stem:
            raise DataFormatError(path, None, "dataset/model do not match the file's place",
                                  (res["dataset"], res["model"]))
        if not res["runs"]:
            raise DataFormatError(path, None, "no runs", res["runs"])
        out.setdefault(res["dataset"], []).append(res)
    for rows in out.values():
        rows.sort(key=lambda r: (r.get("order", 0), r["model"]))
    return out


def mean_spread(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(values: list[float]) -> str:
    m, s = mean_spread(values)
    return f"{m:.4f}" if s is None else f"{m:.4f} ± {s:.4f}"


def row_values(res: dict, split: str, protocol: str, metric: str, rule: str = RULE) -> list[float]:
    return [float(run[split][rule][protocol][metric]) for run in res["runs"]]


def format_table(rows: list[dict]) -> str:
    """The markdown table of one dataset."""
    lines = ["| model | " + " | ".join(f"{c} (paper / filtered)" for c in COLUMNS)
             + " | seeds | best epoch | wall per seed | ties per target |",
             "|---|" + "---|" * (len(COLUMNS) + 4)]
    for res in rows:
        cells = [" / ".join(cell(row_values(res, "test", p, c)) for p in PROTOCOLS) for c in COLUMNS]
        runs = res["runs"]
        epochs = [r.get("best_epoch") for r in runs]
        epochs_txt = "–" if any(e is None for e in epochs) else ", ".join(str(e) for e in epochs)
        secs = [r.get("seconds") for r in runs]
        wall = "–" if any(s is None for s in secs) else _duration(statistics.fmean(secs))
        ties = statistics.fmean(row_values(res, "test", "paper", "mean_ties"))
        seeds = ", ".join(str(r["seed"]) for r in runs)
        lines.append(f"| {res['label']} | " + " | ".join(cells) + f" | {seeds} | {epochs_txt} | {wall} | "
                     f"{ties:.1f} |")
    whole = [r for res in rows for r in res["runs"] if r.get("pipeline_seconds") is not None]
    env = rows[0].get("environment", {})
    hw = env.get("hardware", {})
    scripts = sorted({r.get("script", "?") for r in rows})
    lines.append("")
    lines.append(f"Test split, best-on-validation epoch, tie rule `{RULE}`; mean ± sample standard deviation over "
                 f"the seeds. Generated by `hellm-ds report` from `results/{rows[0]['dataset']}/` "
                 f"({', '.join(f'`{s}`' for s in scripts)}; {env.get('date', '?')}, {hw.get('cpu', '?')}, "
                 f"{hw.get('cores', '?')} cores, load {hw.get('load', '?')}, "
                 f"commit {_commit(env.get('git_commit', '?'))}).")
    if whole:
        loads = [r["pipeline_load"][0] for r in whole if r.get("pipeline_load")]
        load = f"; 1-minute load {min(loads):.1f}–{max(loads):.1f} at its end" if loads else ""
        lines.append(f"The whole `hellm-ds pipeline` of a seed (every stage, evaluation included): "
                     f"{_duration(statistics.fmean(r['pipeline_seconds'] for r in whole))} on average, at most "
                     f"{_duration(max(r['pipeline_seconds'] for r in whole))} (seeds "
                     f"{', '.join(str(r['seed']) for r in whole)}{load}).")
    return "\n".join(lines)


def _commit(commit: str) -> str:
    return commit.removesuffix("+dirty")[:10] + (" with uncommitted changes" if commit.endswith("+dirty") else "")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def render(readme_text: str, tables: dict[str, str]) -> str:
    """``readme_text`` with each marked section replaced by its dataset's table; a marker without results or
    results without a marker is an error (a table must not silently go missing)."""
    seen = set()

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in tables:
            raise UsageError(f"README marks a results table for {name!r} but results/{name}/ has no files")
        seen.add(name)
        return f"<!-- results:{name}:begin -->\n{tables[name]}\n<!-- results:{name}:end -->"

    text = MARKER.sub(sub, readme_text)
    missing = sorted(set(tables) - seen)
    if missing:
        raise UsageError(f"no <!-- results:NAME:begin --> … end marker in the README for {missing}")
    return text


def report(results: str | Path = "results", readme: str | Path = "README.md", check: bool = False) -> dict:
    tables = {name: format_table(rows) for name, rows in load_results(results).items()}
    if (Path(results) / BENCH).is_dir():
        tables[BENCH] = format_bench_table(*load_bench(Path(results) / BENCH))
    path = Path(readme)
    old = path.read_text()
    new = render(old, tables)
    if not check and new != old:
        atomic_write(path, lambda tmp: Path(tmp).write_text(new))
    return {"readme": str(path), "tables": sorted(tables), "up_to_date": new == old,
            "written": not check and new != old}


def add_cli(sub) -> None:
    p = sub.add_parser("report", help="regenerate the README's results and benchmark tables from "
                                      "results/*/*.json")
    p.add_argument("--results", default="results", help="directory of <dataset>/<model>.json result files and "
                                                        "bench/*.json benchmark files")
    p.add_argument("--readme", default="README.md", help="the file whose marked tables are replaced")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if the README is out of date")
    p.set_defaults(func=lambda args: report(args.results, args.readme, check=args.check),
                   exit_status=lambda result: 0 if result["up_to_date"] or result["written"] else 1)


# ---- the Benchmarks table: results/bench/*.json ---------------------------------------------------------
BENCH_ORDER = {"kernels": 10, "finetune": 20, "eval": 30, "eval_model": 40, "import": 50}
GPU_STEPS = ("kernel_tests", "probe", "bench_kernels", "zero3_step", "zero3_offload", "flash_attn", "eval_bf16",
             "pipeline_toys")


def _read_json(path: Path) -> dict:
    try:
        res = json.loads(path.read_text())
    except ValueError as e:
        raise DataFormatError(path, getattr(e, "lineno", None), "not valid JSON", str(e)) from None
    if not isinstance(res, dict):
        raise DataFormatError(path, None, "not a JSON object", type(res).__name__)
    return res


def load_bench(root: str | Path) -> tuple[list[dict], dict | None]:
    """(the benchmark files of ``root`` in table order, the GPU check's summary or None)."""
    root = Path(root)
    files, gpu = [], None
    for path in sorted(root.glob("*.json")):
        res = _read_json(path)
        need = ("benchmark", "command", "environment", "steps") if path.name == GPU_CHECK else \
            ("benchmark", "command", "environment", "results", "summary")
        missing = [k for k in need if k not in res]
        if missing:
            raise DataFormatError(path, None, f"missing key(s) {missing}", sorted(res))
        if path.name == GPU_CHECK:
            gpu = res
        else:
            files.append({**res, "_file": path.name})
    files.sort(key=lambda r: (BENCH_ORDER.get(_bench_kind(r), 99), r["_file"]))
    return files, gpu


def _bench_kind(r: dict) -> str:
    return "eval_model" if r["benchmark"] == "eval" and r.get("model") else r["benchmark"]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(v, digits: int = 3) -> str:
    """A figure: integers with thousands separators, floats to ``digits`` significant digits."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "–"
        if abs(v) >= 10 ** digits:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _span(values: list[float], unit: str = "×", digits: int = 2) -> str:
    values = sorted(values)
    lo, hi = f"{values[0]:.{digits}f}", f"{values[-1]:.{digits}f}"
    return f"{lo}{unit}" if lo == hi else f"{lo}–{hi}{unit}"


def _graph_name(g: str) -> str:
    if g.startswith("data:"):
        return g[5:].capitalize()
    if g.startswith("powerlaw-"):
        users_items, _, nnz = g[len("powerlaw-"):].partition("-")
        return f"power-law {users_items.replace('x', '×')} ({nnz} nnz)"
    return g


def _where(r: dict) -> str:
    env = r["environment"]
    hw = env.get("hardware", {})
    if r.get("device_type") == "cuda" and hw.get("gpu"):
        dev = f"{hw['gpu']} (GPU)"
    else:
        dev = f"{hw.get('cores', '?')}-core {hw.get('cpu', '?')} (CPU)"
    threads = r.get("threads", r.get("torch_threads"))
    thr = f", {threads} thread{'s' if str(threads) != '1' else ''}" if threads not in (None, "") else ""
    return f"{dev}{thr}, load {hw.get('load', '?')}, {env.get('date', '?')}"


def _kernels_figures(r: dict) -> str:
    ok = {tuple(x["params"][k] for k in ("case", "graph", "d", "dtype", "method")): x["metrics"]
          for x in r["results"] if x["status"] == "ok"}
    graphs = list(dict.fromkeys(k[1] for k in ok))
    on_gpu = r.get("device_type") == "cuda"
    base = "cuSPARSE" if on_gpu else "MKL"
    parts = []
    for g in graphs:
        keys = [k for k in ok if k[1] == g]
        figs = []
        if on_gpu:
            for dt in dict.fromkeys(k[3] for k in keys):
                sp = [ok[("spmm", g, k[2], dt, "torch_csr")]["ms"] / ok[k]["ms"] for k in keys
                      if k[0] == "spmm" and k[3] == dt and k[4].startswith("project")
                      and ("spmm", g, k[2], dt, "torch_csr") in ok]
                if sp:
                    figs.append(f"project SpMM {_span(sp)} the speed of cuSPARSE ({dt})")
        coo = [ok[k]["ms"] / ok[("spmm", g, k[2], k[3], "torch_csr")]["ms"] for k in keys
               if k[0] == "spmm" and k[4] == "torch_coo" and ("spmm", g, k[2], k[3], "torch_csr") in ok]
        if coo:
            figs.append(f"COO `sparse.mm` {_span(coo)} the time of torch CSR `@` ({base})")
        for case, what in (("u2u", "U2U (R Rᵀ)"), ("i2i", "I2I (H Hᵀ)")):
            mat = [ok[(case, g, k[2], k[3], "materialised")]["ms"] / ok[k]["ms"] for k in keys
                   if k[0] == case and k[4].startswith("project") and (case, g, k[2], k[3], "materialised") in ok]
            if mat:
                figs.append(f"one two-stage {what} layer {_span(mat)} faster than one SpMM with the "
                            "materialised product")
        if figs:
            parts.append(f"{_graph_name(g)}: " + ", ".join(figs))
    dims = sorted({k[2] for k in ok})
    dtypes = list(dict.fromkeys(k[3] for k in ok))
    if not on_gpu:  # on CPU project[torch] and torch_csr run the same torch CSR `@`: their gap is the noise
        same = [abs(ok[k]["ms"] / ok[(k[0], k[1], k[2], k[3], "torch_csr")]["ms"] - 1) for k in ok
                if k[0] == "spmm" and k[4].startswith("project") and (k[0], k[1], k[2], k[3], "torch_csr") in ok]
        if same:
            parts.append(f"timing noise: the same SpMM timed twice (project and baseline) differs by up to "
                         f"{100 * max(same):.0f} %")
    n_bad = sum(1 for m in ok.values() if not m.get("correct"))
    bad = sum(1 for x in r["results"] if x["status"] in ("error", "oom"))
    tail = (f" (d {', '.join(map(str, dims))}; {', '.join(dtypes)}; medians of "
            f"{r.get('config', {}).get('repeats', '?')} calls; {len(ok)} results, "
            f"{'all within tolerance' if not n_bad else f'{n_bad} FAILED the correctness check'}"
            f"{f', {bad} errors' if bad else ''})")
    if not on_gpu:
        tail += (". No project-vs-MKL SpMM figure: on CPU the project's backend is `torch`, the same torch CSR "
                 "`@` the baseline times")
    return "; ".join(parts) + tail


def _eval_figures(r: dict) -> str:
    d, s = r["data"], r["summary"]
    rec = {x["name"]: x for x in r["results"]}
    proj, base = rec["project"]["metrics"], rec["baseline"]["metrics"]
    g = s["guard"]
    ties = s.get("ties", r.get("config", {}).get("ties", "?"))
    measured = (f"extrapolated from {base['users_measured']:,} rankings" if base.get("extrapolated")
                else "measured on all")
    mt = s.get("mean_ties", {}).get("test", {}).get("paper")
    test = s["metrics_all_users"]["test"]["paper"]
    mm = g["topk_position_mismatches"]
    guard = (f"metrics agree to {g['max_abs_metric_diff']:.0e}, "
             + ("every top-20 position identical" if mm == 0 and not g.get("tied_targets")
                else f"{mm} top-20 positions outside the tie interval")
             + f" ({g['users_per_split']:,} users per split)")
    ds_name = Path(str(d["source"])).name if not str(d["source"]).startswith("synthetic") else "synthetic"
    if r.get("model"):
        m = r["model"]
        cfg = m.get("config", {})
        what = (f"fine-tuned HeLLM (`{cfg.get('model')}`, {m['parameters']:,} parameters, {m['dtype']}, "
                f"{cfg.get('item_head')} head) on {ds_name.capitalize()}, evaluated end to end (LLM forward + "
                f"ranking, both splits and protocols, ties `{ties}`): {proj['seconds']:.1f} s for all "
                f"{proj['users_measured']:,} rankings ({proj['users_per_s']:,.0f} users/s) vs "
                f"{base['seconds']:.1f} s for the authors' batch-1 loop (full logits per user; {measured}): "
                f"**{s['speedup']:.1f}×**; {guard}")
    else:
        what = (f"full ranking of all {d['users']:,} {ds_name.capitalize()} users × {d['items']:,} items, both "
                f"splits and protocols ({d['ranked_users']:,} rankings, d {d['dim']}, "
                f"{rec['project']['params'].get('dtype', 'fp32')} vectors, ties `{ties}`): "
                f"{proj['seconds']:.1f} s ({proj['users_per_s']:,.0f} users/s), **{s['speedup']:.1f}×** a per-user "
                f"loop in the authors' style (dense scores, Python masking, per-user top-k; {measured}); {guard}")
    if r.get("model"):  # (random planted vectors' metrics say nothing)
        what += f"; test NDCG@10 {test['NDCG@10']:.4f} (paper)"
    if mt is not None:
        what += f", mean ties per target {_num(float(mt))}"
    return what


def _import_figures(r: dict) -> str:
    recs = sorted((x for x in r["results"] if x["status"] == "ok"), key=lambda x: x["params"]["interactions"])
    parts = []
    for x in recs:
        n, m = x["params"]["interactions"], x["metrics"]
        parts.append(f"{n / 1e6:g} M interactions ({m['csv_mb']:.0f} MB; {m['users']:,} users × {m['items']:,} "
                     f"items kept) in {m['import_s']:.1f} s, peak {m['peak_rss_mb']:,.0f} MB")
    text = (f"`hellm-ds import` of a synthetic CSV log with string ids (`--k-core "
            f"{recs[0]['params']['k_core'] if recs else '?'}`): " + "; ".join(parts))
    if len(recs) > 1:
        a, b = recs[0], recs[-1]
        scale = b["params"]["interactions"] / a["params"]["interactions"]
        text += (f"; {scale:g}× the log: {b['metrics']['import_s'] / a['metrics']['import_s']:.1f}× the time, "
                 f"{b['metrics']['peak_rss_mb'] / a['metrics']['peak_rss_mb']:.1f}× the peak memory")
    return text


def _finetune_figures(r: dict) -> str:
    cfg = r.get("config", {})
    rec = {x["name"]: x for x in r["results"]}
    parts = []
    for name, label in (("hellm", "HeLLM"), ("hf_peft", "plain HF + peft loop")):
        x = rec.get(name)
        if x is None:
            continue
        if x["status"] != "ok":
            parts.append(f"{label}: {x['status']} ({x['note'][:120]})")
            continue
        m = x["metrics"]
        mfu = m.get("mfu")
        parts.append(f"{label} {m['samples_per_s']:,.1f} samples/s ({m['ms_per_step']:,.1f} ms/step"
                     + (f", MFU {100 * mfu:.2g} %" if mfu and r.get("device_type") == "cuda" else "")
                     + f", peak {m['peak_mem_mb']:,.0f} MB)")
    ratio = r["summary"].get("ratio_samples_per_s") if r["summary"] else None
    ds = f", DeepSpeed `{cfg['deepspeed_config']}`" if cfg.get("deepspeed_config") else ", no DeepSpeed"
    text = (f"`{cfg.get('model')}` shape, scope {cfg.get('trainable_scope')}, batch {cfg.get('batch_size')}, "
            f"{cfg.get('steps')} timed steps{ds}: " + "; ".join(parts))
    if ratio is not None:
        text += f"; HeLLM **{ratio:.2f}×** the baseline's samples/s"
    return text


BENCH_FIGURES = {"kernels": _kernels_figures, "eval": _eval_figures, "eval_model": _eval_figures,
                 "import": _import_figures, "finetune": _finetune_figures}


def _gpu_rows(gpu: dict | None) -> list[str]:
    if gpu is None:
        return [f"| `bash launch/gpu_check.sh` | – | {GPU_PENDING} |"]
    env = gpu["environment"]
    hw = env.get("hardware", {})
    rows = []
    for st in gpu["steps"]:
        where = f"{hw.get('gpu') or 'no GPU seen by torch'}, {st.get('date') or env.get('date', '?')}"
        figs = "; ".join(f"{k} {_num(v)}" for k, v in (st.get("figures") or {}).items())
        head = f"**{st['status']}**" + (f" in {st['seconds']:.0f} s (limit {st['limit_s']} s)"
                                        if st.get("seconds") is not None else "")
        text = head + (f": {figs}" if figs else "") + (f" — {st['note']}" if st.get("note") else "")
        rows.append(f"| `{gpu['command']}` step `{st['name']}` | {where} | {_cell(text)} |")
    return rows


def format_bench_table(files: list[dict], gpu: dict | None) -> str:
    """The README's Benchmarks table: one row per benchmark file, then the GPU check's rows."""
    lines = ["| benchmark (the command that wrote the file) | hardware, threads, load, date | figures "
             "(ratios against the baseline of the same run) |", "|---|---|---|"]
    for r in files:
        lines.append(f"| `{_cell(r['command'])}` | {_cell(_where(r))} | "
                     f"{_cell(BENCH_FIGURES.get(_bench_kind(r), lambda _: '(no renderer)')(r))} |")
    lines += _gpu_rows(gpu)
    commits = sorted({_commit(r["environment"].get("git_commit") or "?")
                      for r in files + ([gpu] if gpu else [])})
    lines.append("")
    lines.append(f"Generated by `hellm-ds report` from `results/bench/` (each file written by the command in its "
                 f"row with `--out results/bench/NAME.json`; commit {', '.join(commits) or '–'}).")
    return "\n".join(lines)


# ---- the GPU check's summary (launch/gpu_check.sh's last step) -------------------------------------------
def _pytest_counts(log: Path) -> dict:
    if not log.is_file():
        return {}
    text = log.read_text(errors="replace")
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    if not lines:
        return {}
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed)", lines[-1])}


def _maybe(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def _finetune_step_figures(res: dict | None) -> dict:
    if not res:
        return {}
    out = {}
    for x in res.get("results", []):
        m = x.get("metrics", {})
        if x.get("status") != "ok":
            out[f"{x['name']} status"] = f"{x.get('status')}: {str(x.get('note'))[:160]}"
            continue
        out[f"{x['name']} samples/s"] = m.get("samples_per_s")
        if x["name"] == "hellm":
            out["hellm ms/step"] = m.get("ms_per_step")
            if m.get("mfu") is not None:
                out["hellm MFU %"] = 100 * m["mfu"]
            out["hellm peak GB"] = (m.get("peak_mem_mb") or 0) / 1024
            out["hellm path"] = x.get("note", "")[:160]
    ratio = (res.get("summary") or {}).get("ratio_samples_per_s")
    if ratio is not None:
        out["hellm / hf_peft samples/s"] = ratio
    return {k: v for k, v in out.items() if v is not None}


def _step_figures(name: str, out: Path) -> dict:
    """The key figures of one step, from the files it left in ``out``."""
    if name == "kernel_tests":
        return _pytest_counts(out / f"{name}.log")
    if name == "probe":  # the whole decision list stays in probe.json; the table gets each choice and timings
        res = _maybe(out / "probe.json") or {}
        figs = {k: v for k, v in res.items() if not isinstance(v, (dict, list))}
        for c in res.get("choices") or []:
            if not isinstance(c, dict):
                continue
            key = f"{c.get('op', '?')} d {c.get('d', '?')} {c.get('dtype', '?')}"
            cands = ", ".join(f"{x.get('name')} {x.get('status')}"
                              + (f" {x['ms']:.3g} ms" if isinstance(x.get("ms"), (int, float)) else "")
                              for x in c.get("candidates") or [] if isinstance(x, dict))
            figs[f"{key} chosen"] = f"{c.get('chosen')} ({cands})" if cands else c.get("chosen")
        return figs
    if name == "bench_kernels":
        res = _maybe(out / "bench_kernels.json")
        if not res:
            return {}
        figs = {f"{_graph_name(s['graph'])}: {s['what']}": s["value"] for s in res.get("summary") or []}
        bad = [x["name"] for x in res.get("results", []) if x.get("status") == "ok"
               and not x["metrics"].get("correct")]
        figs["results failing the correctness check"] = len(bad)
        return figs
    if name in ("zero3_step", "zero3_offload", "flash_attn"):
        return _finetune_step_figures(_maybe(out / f"{name}.json"))
    if name == "eval_bf16":
        res = _maybe(out / f"{name}.json")
        if not res:
            return {}
        s = res.get("summary") or {}
        proj = next((x["metrics"] for x in res.get("results", []) if x["name"] == "project"), {})
        figs = {"seconds (all users)": proj.get("seconds"), "users/s": proj.get("users_per_s"),
                "speed-up vs per-user loop": s.get("speedup"), "guard passed": s.get("correct"),
                "tie rule": s.get("ties"),
                "tied targets in the guard subset": (s.get("guard") or {}).get("tied_targets")}
        for split, protos in (s.get("mean_ties") or {}).items():
            for p, v in protos.items():
                figs[f"mean ties {split} {p}"] = v
        return {k: v for k, v in figs.items() if v is not None}
    if name == "pipeline_toys":
        res = _maybe(out / f"{name}.json")
        if not res:
            return {}
        figs = {"pipeline seconds": res.get("seconds")}
        for row in res.get("table", []):
            if row.get("protocol") == "paper":
                figs[f"{row['model']} test NDCG@10"] = row.get("NDCG@10")
        return {k: v for k, v in figs.items() if v is not None}
    return {}


def write_gpu_summary(out: str | Path, wanted: list[str] | None = None, previous: str | Path | None = None,
                      command: str = "bash launch/gpu_check.sh") -> int:
    """Write ``out/gpu_check.json`` from the step status files ``out/steps/NAME.status`` (``rc seconds
    limit``; ``out/NAME.skip`` holds a skipped step's note) and each step's own outputs; returns the number of
    failed steps. Steps of ``wanted`` that did not run this time keep their entry from ``previous`` (an
    earlier summary, marked with its date) or are listed as ``not run``."""
    from hellm_ds.utils.bench import environment

    out = Path(out)
    wanted = list(wanted or GPU_STEPS)
    prev = {s["name"]: s for s in ((_maybe(Path(previous)) or {}).get("steps", []) if previous else [])}
    prev_date = ((_maybe(Path(previous)) or {}).get("environment") or {}).get("date") if previous else None
    env = environment()
    steps, failed = [], 0
    for name in list(dict.fromkeys([*GPU_STEPS, *wanted])):
        status_file = out / "steps" / f"{name}.status"
        if not status_file.is_file():
            if name in prev:
                steps.append({**prev[name], "date": prev[name].get("date") or prev_date})
            elif name in wanted:
                steps.append({"name": name, "status": "not run", "rc": None, "seconds": None, "limit_s": None,
                              "figures": {}, "note": ""})
            continue
        rc, seconds, limit = (int(x) for x in status_file.read_text().split()[:3])
        skip = out / f"{name}.skip"
        if rc == 0 and skip.is_file():
            status, note = "skipped", skip.read_text().strip()
        elif rc == 0:
            status, note = "passed", ""
        elif rc in (124, 137):
            status, note = "timeout", f"cut at its {limit} s limit; figures are what it wrote before"
        else:
            status, note = "failed", f"exit status {rc} (see {name}.log)"
        failed += status in ("failed", "timeout")
        steps.append({"name": name, "status": status, "rc": rc, "seconds": seconds, "limit_s": limit,
                      "figures": _step_figures(name, out), "note": note, "date": env["date"]})
    versions_txt = out / "versions.txt"
    summary = {"benchmark": "gpu_check", "command": command, "environment": env, "steps": steps,
               "failed": failed, "time_limits_s": sum(s["limit_s"] or 0 for s in steps if s.get("limit_s")),
               "versions_txt": versions_txt.read_text().strip() if versions_txt.is_file() else None}
    atomic_write(out / GPU_CHECK, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1) + "\n"))
    return failed
