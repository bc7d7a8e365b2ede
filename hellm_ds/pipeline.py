"""The whole method in one command: popularity → hypergraphs → graph pre-training → SASRec → ZeRO-3
fine-tuning on every available rank → evaluation of the exported model.

    hellm-ds pipeline --data DIR --out OUT [--model tiny|small|PATH] [--deepspeed-config ds_configs/zero3.json]
                      [--ranks N] [--budget-minutes M] [--graph-time-budget S] [--seq-time-budget S]
                      [--ft-epochs N] [--ft-steps-per-epoch N] [--redo STAGE]

Stages and where they write (each is a directory of OUT with a ``stage.json`` written last):

    popularity  OUT/popularity/   the baseline's metrics
    graphs      OUT/graphs/       the cached UI / U2U / I2I structures (``hellm-ds build-graphs``)
    graph       OUT/graph/        MMHCL graph embeddings (``pretrain-graph``)
    sasrec      OUT/sasrec/       SASRec item embeddings (``pretrain-seq``)
    finetune    OUT/finetune/     HeLLM under DeepSpeed, launched as ``deepspeed --num_gpus N --module
                                  hellm_ds.train`` (N = the GPUs; 2 CPU ranks with DS_ACCELERATOR=cpu
                                  without GPUs; ``--ranks 1`` runs one plain process)
    evaluate    OUT/evaluate/     the export reloaded without DeepSpeed and evaluated (``hellm-ds evaluate``)

A stage is skipped when its ``stage.json`` records the same inputs: the dataset's fingerprint, the stage's
configuration and the SHA-256 of the upstream files it reads. A stage whose inputs changed is refused (its
results would silently mix two configurations) until ``--redo STAGE`` clears it and everything downstream. A
stage interrupted before its ``stage.json`` is resumed from its own checkpoint (graph, sasrec, finetune).

Run length (``hellm_ds.plan``). Without GPUs, and when none of --graph-epochs, --graph-time-budget,
--seq-epochs, --seq-time-budget, --ft-epochs, --ft-steps-per-epoch is given, the run fits a 60-minute budget
(``--budget-minutes M`` sets another, on any machine; ``--budget-minutes 0`` none): after the popularity and
graphs stages, a few steps of graph pre-training, SASRec and fine-tuning are timed on the real data (7–8 s
on Toys), and the stages get a time budget (graph, SASRec) and epochs × steps per epoch (fine-tuning) that
fit; graph pre-training, SASRec and evaluation run on one CPU thread when other processes keep the cores
busy. A table of the plan (stage, what, estimated minutes) goes to stderr first, and the result JSON's
``"plan"`` holds each stage's estimate next to its measured seconds. Settings given explicitly are kept. The
plan is recorded in ``OUT/plan.json`` and reused by a rerun with the same plan inputs, so the stages' keys
stay the same and a finished pipeline is skipped. On Toys (19k users, 12k items, 168k interactions) on the
2-core development CPU under load ≈2 this came to ≈17 min of graph pre-training (≈21 epochs), 12 of SASRec
(≈28 epochs) and 30 of fine-tuning (2 epochs × ≈3,900 steps of 2 × 8 samples); every figure depends on the
machine and its load, and fine-tuning (no time budget, a fixed number of steps) runs longer when the machine
gets busier than it was while the plan was timed. With GPUs, or with any of the settings above, the epoch
defaults apply: graph pre-training and SASRec up to 200 epochs with early stopping, fine-tuning 20 epochs of
the whole data.

Defaults: a config-built backbone (``tiny``, ``small``) has no pre-trained weights, so it trains with scope
``full`` and the tied item head; a local checkpoint uses METHOD's ``lora`` scope and linear head
(``--trainable-scope`` / ``--item-head`` override). Prints one JSON object (every stage's result and the
comparison table) on stdout and the table on stderr. Its ``"examples"``: the exported model's top-10 items
(history excluded) for the first 3 test users, as ``hellm-ds recommend`` gives them (raw ids and titles when
the dataset has the files), computed once by the evaluate stage (which reloads the export for them).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from hellm_ds.errors import UsageError
from hellm_ds.utils.ds_configs import read_ds_config
from hellm_ds.utils.checkpoint import file_sha256
from hellm_ds.utils.io import write_json_atomic

STAGES = ("popularity", "graphs", "graph", "sasrec", "finetune", "evaluate")
UPSTREAM = {"graph": ("graphs",), "finetune": ("graph", "sasrec"), "evaluate": ("finetune",)}
STAMP = "stage.json"


def _opt(default, text: str):
    """A field whose ``--flag`` (made by ``add_cli``) has help ``text``."""
    return field(default=default, metadata={"help": text})


@dataclass
class PipelineConfig:
    data: str
    out: str
    model: str = _opt("tiny", "tiny|small|llama-7b-shape or a local HF checkpoint directory")
    deepspeed_config: str = _opt("ds_configs/zero3.json", "DeepSpeed JSON config of the fine-tuning stage")
    ranks: int | None = _opt(None, "fine-tuning ranks (default: every GPU, or 2 CPU ranks without GPUs; "
                                   "1: one plain process)")
    max_len: int = _opt(50, "keep each user's last N items")
    seed: int = _opt(0, "random seed of every stage")
    ties: str = _opt("expected", "tie rule of every stage's metrics and selection: expected (mean over random "
                                 "tie orders) or optimistic (in the target's favour, as the published numbers)")
    # graphs + graph pre-training
    knn_k: int = _opt(10, "kNN hyperedge size per item and modality (self included)")
    graph_preset: str | None = _opt(None, "the authors' tuned MMHCL hyper-parameters for a dataset "
                                          "(default: hellm_ds's)")
    graph_epochs: int | None = _opt(None, "graph pre-training: maximum epochs (default: 200)")
    graph_eval_every: int = _opt(5, "graph pre-training: validate every N epochs")
    graph_batch_size: int = _opt(1024, "graph pre-training: (user, positive, negative) triples per step")
    graph_time_budget: float | None = _opt(None, "graph pre-training: seconds (default: the plan's with a "
                                                 "budget, else no limit)")
    # SASRec
    seq_epochs: int | None = _opt(None, "SASRec: maximum epochs (default: 200)")
    seq_eval_every: int = _opt(1, "SASRec: validate every N epochs")
    seq_time_budget: float | None = _opt(None, "SASRec: seconds (default: the plan's with a budget, else no "
                                               "limit)")
    # fine-tuning (the rest are FinetuneConfig's defaults)
    ft_epochs: int | None = _opt(None, "fine-tuning epochs (default: the plan's with a budget, else 20)")
    ft_lr: float = _opt(3e-4, "fine-tuning peak learning rate")
    ft_micro_batch: int | None = _opt(None, "fine-tuning examples per rank and micro-step (default: the JSON's)")
    ft_steps_per_epoch: int | None = _opt(None, "cap on fine-tuning optimiser steps per epoch "
                                                "(default: the plan's with a budget, else the whole shard)")
    ft_patience: int = _opt(5, "fine-tuning validation epochs without a new best before stopping")
    trainable_scope: str = _opt("auto", "lora or full; auto: full for a config-built backbone, lora for a "
                                        "checkpoint directory")
    item_head: str = _opt("auto", "linear or tied; auto: tied for a config-built backbone, linear for a "
                                  "checkpoint directory")
    objective: str = _opt("auto", "fine-tuning objective: all (every history position predicts its next item) "
                                  "or last (METHOD: one prefix per sample); auto: all for a config-built "
                                  "backbone, last for a checkpoint directory")
    prompt: str = _opt("auto", "items (BOS + soft item tokens) or method (METHOD's instruction); auto: items "
                               "for a config-built backbone, method for a checkpoint directory")
    # the run plan (hellm_ds.plan): None = 60 minutes without GPUs when no stage setting above is given
    budget_minutes: float | None = _opt(None, "fit the whole run in about M minutes: a few steps of each "
                                              "stage are timed and the unset stage settings chosen to fit "
                                              "(default: 60 without GPUs when no --graph-/--seq-/--ft- "
                                              "epochs, time budget or steps is given, else none; 0: none)")
    redo: tuple[str, ...] = field(default_factory=tuple)
    progress: bool = True
    verbose: bool = False  # the fine-tuning launcher's whole output on the terminal, not only in its log

    def __post_init__(self):
        self.redo = tuple(self.redo)
        bad = [s for s in self.redo if s not in STAGES]
        if bad:
            raise UsageError(f"--redo takes stages from {STAGES}, got {bad}")
        if self.ranks is not None and self.ranks < 1:
            raise UsageError(f"--ranks must be ≥ 1, got {self.ranks}")


# ---- stage bookkeeping -----------------------------------------------------------------------------------
def inputs_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def read_stamp(stage_dir: Path) -> dict | None:
    p = stage_dir / STAMP
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        return None  # a torn stamp = not done


def downstream(stage: str) -> set[str]:
    out = {stage}
    changed = True
    while changed:
        changed = False
        for s, ups in UPSTREAM.items():
            if s not in out and out & set(ups):
                out.add(s)
                changed = True
    return out


def say(msg: str) -> None:
    print(f"[pipeline] {msg}", file=sys.stderr, flush=True)


class Stage:
    """One stage's directory, its inputs and whether it is already done for them."""

    def __init__(self, root: Path, name: str, inputs: dict):
        self.name, self.dir, self.inputs, self.key = name, root / name, inputs, inputs_key(inputs)

    def done(self) -> dict | None:
        st = read_stamp(self.dir)
        if st is None:
            return None
        if st.get("key") != self.key:
            old = st.get("inputs", {})
            diff = sorted(k for k in set(old) | set(self.inputs) if old.get(k) != self.inputs.get(k))
            raise UsageError(f"stage {self.name!r} in {self.dir} was run with other inputs (differing: {diff}); "
                             f"pass --redo {self.name} to run it again (and everything after it), or use "
                             "another --out")
        return st["result"]

    def finish(self, result: dict, seconds: float) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.dir / STAMP, {"key": self.key, "inputs": self.inputs, "result": result,
                                       "seconds": round(seconds, 2)})
        return result


# ---- the run ---------------------------------------------------------------------------------------------
def default_ranks() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else min(2, os.cpu_count() or 1)


def graph_train_config(cfg: PipelineConfig):
    """The graph stage's GraphTrainConfig (``cfg``'s epochs resolved, see ``hellm_ds.plan``)."""
    from hellm_ds.pretrain.mmhcl import MMHCLConfig
    from hellm_ds.pretrain.presets import GRAPH_PRESETS
    from hellm_ds.pretrain.train_graph import GraphTrainConfig

    if cfg.graph_preset is not None and cfg.graph_preset not in GRAPH_PRESETS:
        raise UsageError(f"--graph-preset must be one of {sorted(GRAPH_PRESETS)}, got {cfg.graph_preset!r}")
    preset = GRAPH_PRESETS.get(cfg.graph_preset, {}) if cfg.graph_preset else {}
    train_kw = {**preset.get("train", {}), "knn_k": cfg.knn_k, "epochs": cfg.graph_epochs,
                "eval_every": cfg.graph_eval_every, "batch_size": cfg.graph_batch_size,
                "time_budget": cfg.graph_time_budget, "seed": cfg.seed, "ties": cfg.ties}
    return GraphTrainConfig(model=MMHCLConfig(**preset.get("model", {})), **train_kw)


def sasrec_train_config(cfg: PipelineConfig):
    """The sasrec stage's SASRecTrainConfig (``cfg``'s epochs resolved)."""
    from hellm_ds.pretrain.train_sasrec import SASRecTrainConfig

    return SASRecTrainConfig(max_len=cfg.max_len, epochs=cfg.seq_epochs, eval_every=cfg.seq_eval_every,
                             time_budget=cfg.seq_time_budget, seed=cfg.seed, ties=cfg.ties)


@dataclass
class PipelineRun:
    """What the stages share: the configuration (its unset settings resolved by the plan before graph
    pre-training), the dataset, the output root, and the fine-tuning set-up checked before any stage runs."""

    cfg: PipelineConfig
    dataset: object
    root: Path
    model: str  # a size name, or the checkpoint directory resolved
    scope: str
    head: str
    ds_config: Path
    ds_json: dict
    graphs: object  # () -> Graphs, built (or loaded) once in this process
    ranks: int
    objective: str = "last"
    prompt: str = "method"
    keys: dict = field(default_factory=dict)  # stage → the key of the inputs it ran (or was skipped) with

    @property
    def exports(self) -> tuple[Path, Path]:
        from hellm_ds.pretrain.train_graph import EXPORT_NAME as GRAPH_EXPORT
        from hellm_ds.pretrain.train_sasrec import EXPORT_NAME as SEQ_EXPORT

        return self.root / "graph" / GRAPH_EXPORT, self.root / "sasrec" / SEQ_EXPORT


# ---- the stages: one function each (what it runs), and what keys its skip --------------------------------
def _popularity(run: PipelineRun, d: Path) -> dict:
    from hellm_ds.baselines.popularity import evaluate_popularity

    return evaluate_popularity(run.dataset, progress=run.cfg.progress, ties=run.cfg.ties)


def _graphs(run: PipelineRun, d: Path) -> dict:  # d is root / "graphs": the structures' cache
    return run.graphs().sizes(exact_products=False)


def _graph(run: PipelineRun, d: Path) -> dict:
    from hellm_ds.pretrain.train_graph import train_graph

    resume = (d / "checkpoint_last.pt").is_file()
    if resume:
        say("graph: resuming an interrupted run")
    res = train_graph(run.dataset, graph_train_config(run.cfg), d, resume=resume, progress=run.cfg.progress,
                      graphs=run.graphs())
    return {**res, "export": str(run.exports[0])}


def _sasrec(run: PipelineRun, d: Path) -> dict:
    from hellm_ds.pretrain.train_sasrec import train_sasrec

    resume = any(d.glob("checkpoint*"))
    if resume:
        say("sasrec: resuming an interrupted run")
    res = train_sasrec(run.dataset, sasrec_train_config(run.cfg), d, resume=resume, progress=run.cfg.progress)
    return {**res, "export": str(run.exports[1])}


def _finetune_args(run: PipelineRun) -> dict:
    cfg = run.cfg
    return {"model": run.model, "epochs": cfg.ft_epochs, "lr": cfg.ft_lr, "micro_batch_size": cfg.ft_micro_batch,
            "steps_per_epoch": cfg.ft_steps_per_epoch, "max_len": cfg.max_len, "patience": cfg.ft_patience,
            "trainable_scope": run.scope, "item_head": run.head, "objective": run.objective,
            "prompt": run.prompt, "seed": cfg.seed, "ties": cfg.ties}


def _finetune_inputs(run: PipelineRun) -> dict:
    graph_emb, seq_emb = run.exports
    return {"args": _finetune_args(run), "ranks": run.ranks, "deepspeed_config": run.ds_json,
            "graph_emb": file_sha256(graph_emb), "seq_emb": file_sha256(seq_emb)}


def _finetune(run: PipelineRun, d: Path) -> dict:
    from hellm_ds.exports import RESULTS_NAME

    cfg, (graph_emb, seq_emb) = run.cfg, run.exports
    resume = (d / "checkpoints" / "latest").is_file()
    if resume:
        say("finetune: resuming from the latest checkpoint")
    argv = ["--data", str(Path(cfg.data).resolve()), "--graph-emb", str(graph_emb), "--seq-emb", str(seq_emb),
            "--out", str(d), "--deepspeed_config", str(run.ds_config)]
    for k, v in _finetune_args(run).items():
        if v is not None:
            argv += ["--" + k.replace("_", "-"), str(v)]
    argv += [flag for flag, on in (("--resume", resume), ("--no-progress", not cfg.progress),
                                   ("--verbose", cfg.verbose)) if on]
    from hellm_ds.train.launch import launch_finetune

    launch_finetune(argv, run.ranks, d / "launcher.log", verbose=cfg.verbose, say=say)
    res = json.loads((d / RESULTS_NAME).read_text())
    return {k: v for k, v in res.items() if k != "losses"}


def _evaluate(run: PipelineRun, d: Path) -> dict:
    """The export reloaded in a plain process (what `hellm-ds evaluate` / `recommend` load), read once."""
    from hellm_ds.eval.checkpoint import evaluate_checkpoint
    from hellm_ds.exports import load_checkpoint_model
    from hellm_ds.utils.device import resolve_device

    ckpt = run.root / "finetune"
    model = load_checkpoint_model(ckpt, run.dataset, resolve_device("auto"))
    res = evaluate_checkpoint(ckpt, run.dataset, progress=run.cfg.progress, ties=run.cfg.ties, model=model)
    return {**res, "examples": recommend_examples(ckpt, run.dataset, model=model)}


def _evaluate_inputs(run: PipelineRun) -> dict:
    return {"finetune": run.keys["finetune"], "ties": run.cfg.ties}


# name, the inputs that key its skip (besides the dataset's fingerprint), the command
STAGE_TABLE = (
    ("popularity", lambda run: {"ties": run.cfg.ties}, _popularity),
    ("graphs", lambda run: {"knn_k": run.cfg.knn_k}, _graphs),
    ("graph", lambda run: {"config": asdict(graph_train_config(run.cfg))}, _graph),
    ("sasrec", lambda run: {"config": {k: v for k, v in asdict(sasrec_train_config(run.cfg)).items()
                                       if k not in ("device", "num_threads")}}, _sasrec),
    ("finetune", _finetune_inputs, _finetune),
    ("evaluate", _evaluate_inputs, _evaluate),
)
assert tuple(name for name, _, _ in STAGE_TABLE) == STAGES


def _run_stage(run: PipelineRun, name: str, inputs: dict, command) -> tuple[dict, float | None]:
    """The stage's result and seconds: skipped when its stamp records these inputs, else run and stamped."""
    st = Stage(run.root, name, {"dataset": run.dataset.fingerprint, **inputs})
    run.keys[name] = st.key
    prev = st.done()
    if prev is not None:
        say(f"{name}: done for these inputs, skipped ({st.dir / STAMP})")
        return prev, (read_stamp(st.dir) or {}).get("seconds")
    say(f"{name}: running → {st.dir}")
    t0 = time.time()
    res = st.finish(command(run, st.dir), time.time() - t0)
    return res, round(time.time() - t0, 2)


def _prepare(cfg: PipelineConfig) -> PipelineRun:
    """Check the fine-tuning stage's inputs before any stage runs (a bad --model or DeepSpeed config fails
    now, not after stage 1), load the dataset, and clear what ``--redo`` names."""
    from hellm_ds.data.dataset import load_dataset
    from hellm_ds.graph.build import GraphConfig, load_or_build
    from hellm_ds.llm.backbone import check_model
    from hellm_ds.llm.config import resolve_objective, resolve_scope_and_head

    model = check_model(cfg.model)
    # scope, head, objective and prompt: the trainer's own rules (it warns, in its output)
    scope, head = resolve_scope_and_head(model, cfg.trainable_scope, cfg.item_head, warn=False)
    objective, prompt, _ = resolve_objective(model, cfg.objective, cfg.prompt)
    ds_config, ds_json = read_ds_config(cfg.deepspeed_config, "--deepspeed-config")
    dataset = load_dataset(cfg.data, max_len=cfg.max_len)  # first: a bad --data leaves no empty --out behind
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    for s in sorted(set().union(*(downstream(r) for r in cfg.redo)) if cfg.redo else ()):
        if (root / s).exists():
            say(f"--redo: clearing {root / s}")
            shutil.rmtree(root / s)
    graphs = functools.cache(lambda: load_or_build(dataset, GraphConfig(knn_k=cfg.knn_k), root / "graphs"))
    return PipelineRun(cfg, dataset, root, model, scope, head, ds_config, ds_json, graphs,
                       cfg.ranks or default_ranks(), objective, prompt)


def _apply_plan(run: PipelineRun, seconds: dict) -> dict | None:
    """The run plan (``hellm_ds.plan``): with a budget (by default 60 minutes without GPUs), the unset stage
    settings are chosen from a few timed steps (recorded in RUN/plan.json and reused); without one, the epoch
    defaults. Either way every setting of ``run.cfg`` is resolved afterwards."""
    import torch

    from hellm_ds.plan import apply_plan

    run.cfg, plan = apply_plan(run.cfg, dataset=run.dataset, root=run.root, cuda=torch.cuda.is_available(),
                               ranks=run.ranks, model=run.model, scope=run.scope, head=run.head,
                               ds_json=run.ds_json, graphs=run.graphs,
                               spent={k: seconds[k] or 0.0 for k in ("popularity", "graphs")})
    if plan is not None and plan.get("threads"):
        torch.set_num_threads(plan["threads"])  # graph, sasrec and evaluate run here, as the plan timed them
    return plan


def run_pipeline(cfg: PipelineConfig) -> dict:
    import torch

    from hellm_ds.plan import format_report, plan_report

    t_all, threads = time.time(), torch.get_num_threads()
    run = _prepare(cfg)
    results: dict[str, dict] = {}
    seconds: dict[str, float | None] = {}  # each stage's wall time (a skipped one: when it ran, from its stamp)
    plan = None
    try:
        for name, inputs, command in STAGE_TABLE:
            if name == "graph":  # the plan times the structures' stages' results, before stage 1 trains
                plan = _apply_plan(run, seconds)
            results[name], seconds[name] = _run_stage(run, name, inputs(run), command)
    finally:
        torch.set_num_threads(threads)
    table = comparison_table(results)
    print(format_table(table, run.cfg.ties), file=sys.stderr, flush=True)
    report = plan_report(plan, {**seconds, "plan": plan and plan["plan_seconds"]})
    if report is not None:
        print(format_report(report), file=sys.stderr, flush=True)
    return {"out": str(run.root), "ranks": run.ranks, "trainable_scope": run.scope, "item_head": run.head,
            "objective": run.objective, "prompt": run.prompt,
            "seconds": round(time.time() - t_all, 1), "load_average": [round(x, 2) for x in os.getloadavg()],
            "ties": run.cfg.ties, "table": table, "plan": report,
            "stages": {k: {n: v for n, v in results[k].items() if n != "examples"}
                       for k in STAGES if k in results},
            "examples": results.get("evaluate", {}).get("examples")}


def recommend_examples(checkpoint_dir: str | Path, dataset, n_users: int = 3, k: int = 10,
                       model=None) -> list[dict]:
    """``hellm-ds recommend --exclude-history --k K`` for the first ``n_users`` users of the test split: their
    ``users`` entries (``user``, ``items``, ``scores``, and ``titles``/``raw_user``/``raw_items`` when the
    dataset has ``items.tsv``/``hellm-ds import``'s mapping files); the history is everything the dataset
    holds for the user, as in ``recommend``. ``model``: the export already loaded (``load_checkpoint_model``
    on the default device), not loaded again."""
    from hellm_ds.eval.recommend import recommend

    users = [int(dataset.user_ids[u]) for u in dataset.split("test").users[:n_users]]
    if not users:
        return []
    return recommend(checkpoint_dir, dataset, users, k=k, exclude_history=True, progress=False,
                     model=model)["users"]


def comparison_table(results: dict) -> list[dict]:
    """Test-split rows (both protocols) for popularity, SASRec, graph-only and the fine-tuned model; each
    with the mean number of items tied with the target (a degenerate model shows there)."""
    from hellm_ds.eval.metrics import MEAN_TIES

    rows = []
    for name, stage in (("popularity", "popularity"), ("SASRec", "sasrec"), ("graph (MMHCL)", "graph"),
                        ("HeLLM fine-tuned", "evaluate")):
        res = results.get(stage)
        if not res or not res.get("test"):
            continue
        for proto in ("paper", "filtered"):
            m = res["test"][proto]
            rows.append({"model": name, "protocol": proto,
                         **{k: m.get(k) for k in ("Recall@10", "NDCG@10", "Recall@20", "NDCG@20", MEAN_TIES)}})
    return rows


def format_table(rows: list[dict], ties: str = "expected") -> str:
    from hellm_ds.eval.metrics import MEAN_TIES

    lines = [f"\n{'model':<18} {'protocol':<9} {'R@10':>7} {'N@10':>7} {'R@20':>7} {'N@20':>7} {'ties':>7}   "
             f"(test split; ties {ties})"]
    for r in rows:
        tied = "" if r.get(MEAN_TIES) is None else f"{r[MEAN_TIES]:7.1f}"
        lines.append(f"{r['model']:<18} {r['protocol']:<9} {r['Recall@10']:7.4f} {r['NDCG@10']:7.4f} "
                     f"{r['Recall@20']:7.4f} {r['NDCG@20']:7.4f} {tied}")
    return "\n".join(lines)


def add_cli(sub) -> None:
    from hellm_ds.eval.metrics import TIE_RULES
    from hellm_ds.llm.config import ITEM_HEADS, OBJECTIVES, PROMPTS, TRAINABLE_SCOPES
    from hellm_ds.pretrain.presets import GRAPH_PRESETS
    from hellm_ds.utils.cli_args import csv_choices

    p = sub.add_parser("pipeline", help="every stage: baseline, graphs, stage 1, DeepSpeed fine-tuning, "
                       "evaluation (skips what is done)", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="dataset directory (sequences.txt, …)")
    p.add_argument("--out", required=True, help="run directory (one sub-directory per stage)")
    types = {"ranks": int, "ft_micro_batch": int, "ft_steps_per_epoch": int, "graph_time_budget": float,
             "seq_time_budget": float, "graph_preset": str, "graph_epochs": int, "seq_epochs": int,
             "ft_epochs": int, "budget_minutes": float}
    choices = {"graph_preset": sorted(GRAPH_PRESETS), "trainable_scope": ("auto", *TRAINABLE_SCOPES),
               "item_head": ("auto", *ITEM_HEADS), "objective": ("auto", *OBJECTIVES),
               "prompt": ("auto", *PROMPTS), "ties": TIE_RULES}
    for f in fields(PipelineConfig):
        if f.name in ("data", "out", "redo", "progress", "verbose"):
            continue
        flags = ["--" + f.name.replace("_", "-")]
        if f.name == "deepspeed_config":
            flags.append("--deepspeed_config")
        p.add_argument(*flags, dest=f.name, type=types.get(f.name, type(f.default)), default=f.default,
                       choices=choices.get(f.name), help=f.metadata["help"])
    p.add_argument("--redo", type=csv_choices(STAGES, allow_empty=True), default="",
                   help=f"comma-separated stages to run again, with everything after them ({', '.join(STAGES)})")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show DeepSpeed's INFO logs and library warnings "
                   "(otherwise only in RUN/finetune/launcher.log)")
    p.set_defaults(func=_cmd)


def _cmd(args) -> dict:
    kw = {f.name: getattr(args, f.name) for f in fields(PipelineConfig) if hasattr(args, f.name)}
    kw["redo"] = tuple(s.strip() for s in args.redo.split(",") if s.strip())
    return run_pipeline(PipelineConfig(**kw))
