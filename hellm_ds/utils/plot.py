"""Training curves of a run as PNG files, from its metrics log ``DIR/log.jsonl`` (``hellm_ds.utils.runlog``)::

    hellm-ds plot --run DIR [--out DIR/plots] [--metrics Recall@10,NDCG@10] [--smoothing W]

or from Python::

    from hellm_ds.utils.plot import plot_run
    info = plot_run("runs/graph")           # {"files": [{"path": ".../loss.png", "shows": "..."}, ...], ...}

Every recipe writes the one log schema of ``hellm_ds.utils.loop``: ``start`` (naming the recipe), ``resume``,
``epoch`` (``step``, ``epoch`` from 1, ``loss`` and the graph recipe's terms ``bpr``/``reg``/``cl_user``/
``cl_item``, ``valid`` when validated), ``result`` (best ``valid``, ``test``, ``best_epoch``); fine-tuning
adds ``train`` (one per optimiser step: ``loss``, ``lr``). Curves with per-step records are drawn per
optimiser step, the others per epoch.

Files written to ``out`` (default ``DIR/plots``), each atomically (a temporary file, then ``os.replace``):

- ``loss.png``     the training loss per optimiser step (finetune) or per epoch (stage 1): the raw values as
  a faint line and a smoothed line over them (a bias-corrected exponential moving average; its weight
  defaults to ``1 - 10/n`` for ``n`` points, capped at 0.99, so a short run is shown unsmoothed);
- ``loss_terms.png`` the graph recipe's loss terms (BPR, regularisation, contrastive), one panel each;
- ``lr.png``       the learning rate per step, when the log has one;
- ``metrics.png``  the validation metrics (default Recall@10 and NDCG@10) of both protocols (``paper`` and
  ``filtered``) vs epoch (stage 1) or optimiser step (finetune), with the test point at the best epoch marked.

Resumed runs: records appended after a ``resume`` event replace the earlier ones of the same step (the last
value of each step is kept), and records of the abandoned run beyond the resume point are dropped. (A fresh
run truncates its log.)

A missing log or a line that is not a JSON object with the fields its event needs raises
``hellm_ds.errors.DataFormatError`` naming the file and line; matplotlib missing raises ``UsageError``.
Returns a JSON-able dict: the run, the recipe, the files written (path, name, what each shows), the best epoch
and test metrics when logged.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from hellm_ds.errors import DataFormatError, UsageError
from hellm_ds.utils.io import atomic_write
from hellm_ds.utils.runlog import read_log

LOG_NAME = "log.jsonl"
DEFAULT_METRICS = ("Recall@10", "NDCG@10")
PROTOCOLS = ("paper", "filtered")
GRAPH_TERMS = ("bpr", "reg", "cl_user", "cl_item")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "infinity": math.inf, "-inf": -math.inf, "-infinity": -math.inf}


# ---- reading ------------------------------------------------------------------------------------------------
def _line_numbers(path: Path) -> list[int]:
    """1-based numbers of the non-blank lines, i.e. of the records ``read_log`` returns, in order."""
    with path.open("rb") as f:
        return [i for i, raw in enumerate(f, 1) if raw.strip()]


def _locate_garbled(path: Path) -> DataFormatError:
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                return DataFormatError(path, i, "log line is not UTF-8 text", raw[:80])
            except ValueError as e:
                text = raw.decode("utf-8").rstrip("\n")
                why = "an interrupted write?" if not raw.endswith(b"\n") else e.msg
                return DataFormatError(path, i, f"log line is not valid JSON ({why})",
                                       text if len(text) <= 80 else text[:77] + "...")
    return DataFormatError(path, None, "unreadable run log")


def _log_path(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    return path if path.is_file() or path.name == LOG_NAME else path / LOG_NAME


def load_log(run_dir: str | Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` of every record of ``run_dir/log.jsonl`` (or of that file itself), each
    checked to be a JSON object with a string ``event``."""
    path = _log_path(run_dir)
    if not path.is_file():
        raise DataFormatError(path, None, "run log not found (a run writes it as it trains)")
    try:
        records = read_log(path)
    except (ValueError, UnicodeDecodeError):  # json.JSONDecodeError is a ValueError
        raise _locate_garbled(path) from None
    lines = _line_numbers(path)
    for ln, rec in zip(lines, records):
        if not isinstance(rec, dict):
            raise DataFormatError(path, ln, "log line is not a JSON object", rec)
        if not isinstance(rec.get("event"), str):
            raise DataFormatError(path, ln, "log record has no 'event' name", rec.get("event"))
    return list(zip(lines, records))


def _num(path: Path, ln: int, rec: dict, key: str, required: bool = True) -> float | None:
    """A numeric field (non-finite values are logged as the strings 'nan', 'inf')."""
    if key not in rec or rec[key] is None:
        if required:
            raise DataFormatError(path, ln, f"'{rec['event']}' record has no '{key}'")
        return None
    v = rec[key]
    if isinstance(v, bool):
        raise DataFormatError(path, ln, f"'{key}' is not a number", v)
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in _NONFINITE:
        return _NONFINITE[v.strip().lower()]
    raise DataFormatError(path, ln, f"'{key}' is not a number", v)


def _step(path: Path, ln: int, rec: dict, key: str = "step") -> int:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise DataFormatError(path, ln, f"'{rec['event']}' record has no integer '{key}'", v)
    return v


def _metrics(path: Path, ln: int, obj, what: str) -> dict:
    """``{protocol: {metric: float}}`` checked for shape."""
    if not isinstance(obj, dict) or not obj:
        raise DataFormatError(path, ln, f"'{what}' is not a {{protocol: {{metric: value}}}} object", obj)
    out = {}
    for proto, ms in obj.items():
        if not isinstance(ms, dict):
            raise DataFormatError(path, ln, f"'{what}.{proto}' is not a {{metric: value}} object", ms)
        out[proto] = {}
        for name, v in ms.items():
            if v is None:  # bench/JSON writers turn NaN into null
                out[proto][name] = math.nan
                continue
            out[proto][name] = _num(path, ln, {"event": what, name: v}, name)
    return out


def detect_recipe(records: list[dict]) -> str:
    """The recipe the ``start`` record names (``hellm_ds.utils.loop``); a log that does not begin with one
    (an interrupted first start) is recognised by its per-step ``train`` records (fine-tuning only)."""
    for r in records:
        if r["event"] == "start" and r.get("recipe") in ("graph", "sasrec", "finetune"):
            return r["recipe"]
    if any(r["event"] == "train" for r in records):
        return "finetune"
    return "unknown" if not any(r["event"] == "epoch" for r in records) else "stage-1"


class _Series:
    """Step-keyed values where a later record of the same step wins and a resume drops later steps."""

    def __init__(self):
        self.by_step: dict[int, object] = {}

    def put(self, step: int, value) -> None:
        self.by_step[step] = value

    def truncate_after(self, step: int) -> None:
        for s in [s for s in self.by_step if s > step]:
            del self.by_step[s]

    def items(self) -> list[tuple[int, object]]:
        return sorted(self.by_step.items())

    def __len__(self) -> int:
        return len(self.by_step)


def parse_run(run_dir: str | Path) -> dict:
    """The curves of a run, deduplicated: ``{"recipe", "x_label", "loss": [(x, y)], "terms": {name: [(x, y)]},
    "lr": [(x, y)], "valid": [(x, {proto: {metric: v}})], "test": (x, metrics) | None, "best_epoch",
    "resumes", "records"}``. Every series is keyed by the optimiser step (a ``resume`` drops the records
    after its step); x is the step for fine-tuning (per-step ``train`` records) and the epoch otherwise."""
    log_path = _log_path(run_dir)
    records = load_log(log_path)
    recipe = detect_recipe([r for _, r in records])
    per_step = any(r["event"] == "train" for _, r in records)
    loss, lr, valid, epochs = _Series(), _Series(), _Series(), _Series()  # epochs: step → epoch
    terms: dict[str, _Series] = {}
    best_epoch, final_test, resumes = None, None, 0
    for ln, rec in records:
        ev = rec["event"]
        if ev == "resume":
            resumes += 1
            at = _step(log_path, ln, rec)
            for series in (loss, lr, valid, epochs, *terms.values()):
                series.truncate_after(at)
        elif ev == "train":
            s = _step(log_path, ln, rec)
            loss.put(s, _num(log_path, ln, rec, "loss"))
            v = _num(log_path, ln, rec, "lr", required=False)
            if v is not None:
                lr.put(s, v)
        elif ev == "epoch":
            s = _step(log_path, ln, rec)
            if not per_step:
                loss.put(s, _num(log_path, ln, rec, "loss"))
            epochs.put(s, _step(log_path, ln, rec, "epoch"))
            for k in GRAPH_TERMS:
                if k in rec:
                    terms.setdefault(k, _Series()).put(s, _num(log_path, ln, rec, k))
            if rec.get("valid") is not None:
                valid.put(s, _metrics(log_path, ln, rec["valid"], "valid"))
        elif ev == "result":
            be = rec.get("best_epoch")
            best_epoch = be if isinstance(be, int) and not isinstance(be, bool) else None
            final_test = None if rec.get("test") is None else _metrics(log_path, ln, rec["test"], "test")

    epoch_of = dict(epochs.items())
    x = (lambda s: s) if per_step else (lambda s: epoch_of.get(s, s))
    test_point = None
    if final_test is not None and best_epoch is not None:
        at = [s for s, e in epochs.items() if e == best_epoch]  # the step of the best epoch's (last) record
        if not per_step:
            test_point = (best_epoch, final_test)
        elif at:
            test_point = (at[-1], final_test)
    return {
        "path": str(log_path), "recipe": recipe,
        "x_label": "optimiser step" if per_step else "epoch",
        "loss": [(x(s), v) for s, v in loss.items()],
        "terms": {k: [(x(s), v) for s, v in t.items()] for k, t in terms.items() if len(t)},
        "lr": [(s, v) for s, v in lr.items()],
        "valid": [(x(s), m) for s, m in valid.items()],
        "test": test_point, "best_epoch": best_epoch, "resumes": resumes, "records": len(records),
    }


# ---- drawing ------------------------------------------------------------------------------------------------
def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing); non-finite values are skipped
    (they stay gaps). ``weight=None``: ``min(0.99, max(0, 1 - 10/n))``."""
    n = len(values)
    if weight is None:
        weight = min(0.99, max(0.0, 1.0 - 10.0 / max(n, 1)))
    if not 0.0 <= weight < 1.0:
        raise UsageError(f"smoothing weight must be in [0, 1), got {weight}")
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(math.nan)
            continue
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def _figure_api():
    """matplotlib's object API on the Agg canvas (no pyplot, no global backend switch)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("plotting needs matplotlib: pip install matplotlib "
                         "(or, in a checkout, pip install -e .[plot])") from None
    return Figure, FigureCanvasAgg


def _int_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, canvas_cls, out: Path, name: str) -> Path:
    canvas_cls(fig)
    for ax in fig.axes:
        _int_x(ax)  # epochs and steps are whole numbers
    return atomic_write(out / name, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _finite(points):
    return [(x, y) for x, y in points if y is not None and math.isfinite(y)]


def plot_run(run_dir: str | Path, out: str | Path | None = None, metrics=DEFAULT_METRICS,
             smoothing: float | None = None) -> dict:
    """Write the PNG curves of ``run_dir`` (see the module docstring) and return what was written."""
    run = parse_run(run_dir)
    Figure, Canvas = _figure_api()
    run_path = Path(run["path"]).parent
    out = Path(out) if out is not None else run_path / "plots"
    xl = run["x_label"]
    title = f"{run_path.name} ({run['recipe']})"
    files: list[dict] = []
    notes: list[str] = []

    if run["loss"]:
        xs = [x for x, _ in run["loss"]]
        ys = [y for _, y in run["loss"]]
        sm = smooth(ys, smoothing)
        fig = Figure(figsize=(7, 4.2))
        ax = fig.add_subplot()
        ax.plot(xs, ys, color="tab:blue", alpha=0.3, linewidth=1, label="raw")
        ax.plot(xs, sm, color="tab:blue", linewidth=2, label="smoothed")
        if run["best_epoch"] is not None and run["x_label"] == "epoch":
            ax.axvline(run["best_epoch"], color="gray", linestyle=":", linewidth=1, label="best epoch")
        ax.set_xlabel(xl)
        ax.set_ylabel("training loss")
        ax.set_title(f"{title}: loss per {'epoch' if run['x_label'] == 'epoch' else 'step'}")
        ax.grid(alpha=0.3)
        ax.legend()
        bad = len(ys) - len(_finite(run["loss"]))
        if bad:
            notes.append(f"{bad} non-finite loss value(s) left as gaps")
        files.append({"name": "loss.png", "path": str(_save(fig, Canvas, out, "loss.png")),
                      "shows": f"training loss vs {xl}: raw (faint) and smoothed", "points": len(xs),
                      "x": [xs[0], xs[-1]]})
    else:
        notes.append("no training-loss records yet")

    if run["terms"]:
        names = list(run["terms"])
        fig = Figure(figsize=(7, 2.4 * len(names)))
        axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
        for ax, k in zip(axes, names):
            xs = [x for x, _ in run["terms"][k]]
            ys = [y for _, y in run["terms"][k]]
            ax.plot(xs, ys, color="tab:orange", alpha=0.3, linewidth=1)
            ax.plot(xs, smooth(ys, smoothing), color="tab:orange", linewidth=2)
            ax.set_ylabel(k)
            ax.grid(alpha=0.3)
        axes[0].set_title(f"{title}: loss terms")
        axes[-1].set_xlabel(xl)
        fig.tight_layout()
        files.append({"name": "loss_terms.png", "path": str(_save(fig, Canvas, out, "loss_terms.png")),
                      "shows": f"loss terms vs {xl}: {', '.join(names)}", "points": len(run["terms"][names[0]])})

    if run["lr"]:
        xs = [x for x, _ in run["lr"]]
        fig = Figure(figsize=(7, 3.5))
        ax = fig.add_subplot()
        ax.plot(xs, [y for _, y in run["lr"]], color="tab:green", linewidth=2)
        ax.set_xlabel(xl)
        ax.set_ylabel("learning rate")
        ax.set_title(f"{title}: learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        files.append({"name": "lr.png", "path": str(_save(fig, Canvas, out, "lr.png")),
                      "shows": f"learning rate vs {xl}", "points": len(xs)})

    metrics = tuple(metrics)
    if run["valid"] and metrics:
        fig = Figure(figsize=(6 * len(metrics), 4.2))
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        styles = {"paper": ("tab:blue", "o"), "filtered": ("tab:red", "s")}
        shown = set()
        for ax, metric in zip(axes, metrics):
            for proto in PROTOCOLS:
                pts = [(x, m.get(proto, {}).get(metric)) for x, m in run["valid"]]
                pts = _finite(pts)
                if not pts:
                    continue
                color, marker = styles[proto]
                ax.plot([x for x, _ in pts], [y for _, y in pts], color=color, marker=marker, markersize=4,
                        label=f"valid {proto}")
                shown.add((metric, proto))
                if run["test"] is not None:
                    tx, tm = run["test"]
                    ty = tm.get(proto, {}).get(metric)
                    if ty is not None and math.isfinite(ty):
                        ax.scatter([tx], [ty], color=color, marker="*", s=220, edgecolors="black", zorder=5,
                                   label=f"test {proto} (best epoch {run['best_epoch']})")
            ax.set_xlabel(xl)
            ax.set_ylabel(metric)
            ax.set_title(f"{title}: {metric}")
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(fontsize=8)
        missing = [f"{m}/{p}" for m in metrics for p in PROTOCOLS if (m, p) not in shown]
        if missing:
            notes.append(f"not in the log: {', '.join(missing)}")
        fig.tight_layout()
        what = f"validation {', '.join(metrics)} (paper and filtered protocols) vs {xl}"
        if run["test"] is not None:
            what += f"; star = test at the best epoch ({run['best_epoch']})"
        files.append({"name": "metrics.png", "path": str(_save(fig, Canvas, out, "metrics.png")),
                      "shows": what, "points": len(run["valid"])})
    elif not run["valid"]:
        notes.append("no validation records yet")

    result = {"run": str(run_path), "log": run["path"], "recipe": run["recipe"], "out": str(out),
              "records": run["records"], "resumes": run["resumes"], "files": files,
              "best_epoch": run["best_epoch"],
              "test": None if run["test"] is None else {p: {m: v for m, v in ms.items() if m in metrics}
                                                        for p, ms in run["test"][1].items()}}
    if notes:
        result["notes"] = notes
    return result


# ---- command line -------------------------------------------------------------------------------------------
def _cmd(args) -> dict:
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    return plot_run(args.run, args.out, metrics=metrics, smoothing=args.smoothing)


def add_cli(sub) -> None:
    p = sub.add_parser("plot", help="training curves of a run (loss, learning rate, metrics) as PNG files")
    p.add_argument("--run", required=True, help="run directory holding log.jsonl (any recipe's --out)")
    p.add_argument("--out", default=None, help="where the PNG files go (default RUN/plots)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help="comma-separated validation metrics to draw")
    p.add_argument("--smoothing", type=float, default=None,
                   help="EMA weight in [0, 1) for the smoothed loss (default: 1 - 10/points, at most 0.99)")
    p.set_defaults(func=_cmd)
