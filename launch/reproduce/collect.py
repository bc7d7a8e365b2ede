"""Turn a reproduce run directory into the committed result files ``results/<dataset>/<model>.json``.

    python launch/reproduce/collect.py --dataset scientific --data DIR --runs RUNS --script S --command C

``RUNS/seed<k>/pipeline/`` is one ``hellm-ds pipeline`` run per seed (rows popularity, graph, sasrec,
hellm) and ``RUNS/seed<k>/<model>/`` a stand-alone fine-tuning run for an ablation row (its directory name
is the row's model name; the labels are in ``ABLATIONS`` of the calling script, passed as ``--ablation
NAME=LABEL``). Every export is evaluated again here under both tie rules (``expected`` and
``optimistic``), and the ``expected`` figures are checked against what the run itself recorded, so the
file holds what the run produced, not a second opinion. Written beside each row: wall time and best epoch
per seed, the script and command, the date, hardware, load, library versions and git commit.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
PIPELINE_ROWS = {  # model name → (pipeline stage, label, order)
    "popularity": ("popularity", "popularity", 10),
    "graph": ("graph", "graph (MMHCL, batch contrast)", 20),
    "sasrec": ("sasrec", "SASRec (d 64, 2 blocks)", 30),
    "hellm": ("evaluate", "**HeLLM** (`tiny`, scope `full`, per-position objective, items prompt, tied head, "
                          "Gram prefix, SASRec fusion)", 40),
}
RULES = ("expected", "optimistic")
SPLITS = ("valid", "test")


def evaluate_row(model: str, run: Path, dataset) -> dict:
    """``{split: {rule: {protocol: metrics}}}`` of one seed's export of ``model``."""
    from hellm_ds.baselines.popularity import evaluate_popularity
    from hellm_ds.eval.evaluator import evaluate_splits
    from hellm_ds.pretrain.train_graph import EXPORT_NAME as GRAPH_EXPORT
    from hellm_ds.pretrain.train_sasrec import MODEL_NAME, load_sasrec
    from hellm_ds.eval.checkpoint import evaluate_checkpoint
    from hellm_ds.utils.checkpoint import load_tensors

    out: dict = {s: {} for s in SPLITS}
    for rule in RULES:
        if model == "popularity":
            res = evaluate_popularity(dataset, progress=False, ties=rule)
        elif model == "graph":
            t, _ = load_tensors(run / "pipeline" / "graph" / GRAPH_EXPORT)
            user, item = t["user"], t["item"]  # row 0 of each is padding; dataset users are 0-based
            res = evaluate_splits(dataset, lambda b: user[b["users"] + 1], item_vectors=item, progress=False,
                                  ties=rule)
        elif model == "sasrec":
            sas, meta = load_sasrec(run / "pipeline" / "sasrec" / MODEL_NAME)
            # the run's own batch size: another padding width moves the last bits of the scores (and with them
            # an exact tie now and then)
            with torch.no_grad():
                res = evaluate_splits(dataset, sas.user_vectors, item_vectors=sas.item_embeddings(),
                                      batch_size=meta["config"].get("eval_batch_size", 1024), progress=False,
                                      ties=rule)
        else:
            ckpt = run / "pipeline" / "finetune" if model == "hellm" else run / model
            res = evaluate_checkpoint(ckpt, dataset, ties=rule)
        for s in SPLITS:
            out[s][rule] = res[s]
    return out


def recorded(model: str, run: Path) -> tuple[dict, dict]:
    """What the run recorded for ``model``: (its test metrics under ``expected``, bookkeeping)."""
    if model in PIPELINE_ROWS:
        stage = PIPELINE_ROWS[model][0]
        stamp = json.loads((run / "pipeline" / stage / "stage.json").read_text())
        res, seconds = stamp["result"], stamp["seconds"]
        if model == "hellm":  # the evaluate stage re-scores the export; the training facts are finetune's
            ft = json.loads((run / "pipeline" / "finetune" / "stage.json").read_text())
            seconds += ft["seconds"]
            res = {**ft["result"], "test": res["test"]}
    else:
        res = json.loads((run / model / "results.json").read_text())
        seconds = res.get("seconds")
    if res.get("ties", "expected") != "expected":
        raise SystemExit(f"{run}/{model}: recorded under ties={res['ties']!r}; reproduce runs use expected")
    facts = {"seconds": seconds, "best_epoch": res.get("best_epoch"), "epochs_run": res.get("epochs_run")}
    if "fusion_weight" in res:  # the SASRec weight the run picked on validation (--fusion sasrec)
        facts["fusion_weight"] = res["fusion_weight"]
    return res["test"], facts


def pipeline_facts(run: Path) -> dict:
    """The seed's whole ``hellm-ds pipeline``: the sum of its stages' wall seconds (each stage's
    ``stage.json``, so a stage re-run with ``--redo`` counts once, as it ran) and the load average the last
    invocation ended with (``seed<k>/pipeline.json``, when recorded)."""
    from hellm_ds.pipeline import STAGES, STAMP

    seconds = sum(json.loads((run / "pipeline" / s / STAMP).read_text())["seconds"] for s in STAGES)
    try:
        load = json.loads((run / "pipeline.json").read_text()).get("load_average")
    except (OSError, ValueError):
        load = None
    return {"pipeline_seconds": round(seconds, 1), "pipeline_load": load}


def check_same(model: str, seed: int, got: dict, want: dict, tol: float = 1e-6) -> None:
    for proto, metrics in want.items():
        for k, v in metrics.items():
            if abs(got[proto][k] - v) > tol:
                raise SystemExit(f"{model} seed {seed}: re-evaluated test {proto} {k} {got[proto][k]} differs "
                                 f"from the run's record {v}")


def run_commit(runs: Path) -> str | None:
    """The commit the runs were made at (``RUNS/commit.txt``, written by the reproduce script at its start)."""
    f = runs / "commit.txt"
    return f.read_text().strip() if f.is_file() else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="results/<dataset>/")
    p.add_argument("--data", required=True, help="the dataset directory the runs used")
    p.add_argument("--runs", required=True, help="RUNS with seed<k>/ sub-directories")
    p.add_argument("--script", required=True, help="the reproduce script (recorded)")
    p.add_argument("--command", required=True, help="the command of each seed, SEED for the seed (recorded)")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME=LABEL",
                   help="an ablation row: RUNS/seed<k>/NAME is its fine-tuning run")
    p.add_argument("--ablation-command", default="", help="the ablation runs' command (recorded)")
    p.add_argument("--out", default=str(ROOT / "results"), help="results root")
    args = p.parse_args(argv)

    from hellm_ds.data.dataset import load_dataset
    from hellm_ds.utils.bench import environment  # the benchmarks' header: one definition

    runs = sorted(Path(args.runs).glob("seed*"), key=lambda d: int(d.name[4:]))
    if not runs:
        raise SystemExit(f"no seed<k>/ directories in {args.runs}")
    dataset = load_dataset(args.data, max_len=50)  # once: every row and seed is evaluated on it
    env = environment()
    env["git_commit"] = run_commit(Path(args.runs)) or env["git_commit"]  # the runs' commit, not collect's
    rows = {m: (label, order, args.command) for m, (_, label, order) in PIPELINE_ROWS.items()}
    for i, spec in enumerate(args.ablation):
        name, _, label = spec.partition("=")
        rows[name] = (label, 50 + i, args.ablation_command)
    for model, (label, order, command) in rows.items():
        entries = []
        for run in runs:
            seed = int(run.name[4:])
            if model not in PIPELINE_ROWS and not (run / model / "results.json").is_file():
                print(f"{model}: seed {seed} not run, skipped", file=sys.stderr)
                continue
            t0 = time.time()
            metrics = evaluate_row(model, run, dataset)
            want, facts = recorded(model, run)
            if model == "hellm":  # the whole pipeline of the seed, every stage and its evaluation
                facts.update(pipeline_facts(run))
            check_same(model, seed, metrics["test"]["expected"], want)
            entries.append({"seed": seed, **facts, **metrics})
            print(f"{model} seed {seed}: test paper NDCG@10 {metrics['test']['expected']['paper']['NDCG@10']:.4f} "
                  f"(evaluated in {time.time() - t0:.0f} s)", file=sys.stderr)
        if not entries:
            continue
        path = Path(args.out) / args.dataset / f"{model}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"dataset": args.dataset, "model": model, "label": label, "order": order,
                                    "script": args.script, "command": command, "runs": entries,
                                    "environment": env}, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
