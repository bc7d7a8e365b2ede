"""The pipeline's run plan: on a machine without GPUs, ``hellm-ds pipeline`` with no per-stage setting fits a
time budget instead of running epoch-based defaults that take many hours.

    hellm-ds pipeline --data DIR --out RUN                      # CPU: a 60-minute plan; GPU: epoch defaults
    hellm-ds pipeline --data DIR --out RUN --budget-minutes 20  # any machine: a 20-minute plan
    hellm-ds pipeline --data DIR --out RUN --budget-minutes 0   # no plan: the epoch defaults on CPU too

When a plan applies (``budget_minutes``): ``--budget-minutes M`` with M > 0; when it is not given, M = 60 on
a machine without GPUs if none of the per-stage settings (``STAGE_FLAGS``: --graph-epochs,
--graph-time-budget, --seq-epochs, --seq-time-budget, --ft-epochs, --ft-steps-per-epoch) is given. Otherwise
the stages run their epoch-based defaults (graph pre-training and SASRec up to 200 epochs with early stopping,
fine-tuning 20 epochs). A setting given explicitly always wins: with an explicit budget the plan fills in
only the settings left unset, and counts the explicit ones at their estimated cost.

How (``make_plan``): after the popularity and graphs stages (cheap: seconds on Toys), it times a few steps of
each trainable stage on the real data, in the pipeline's process, on the device the stage will use:

- graph pre-training: MMHCL training steps on the cached hypergraphs (``--graph-batch-size`` triples), the
  full propagation a validation starts with, and the ranking of one batch of validation users. Steps are
  timed with one torch thread and, when the cores are otherwise idle, with torch's default too
  (``thread_options``); graph pre-training, SASRec and the evaluation stage then run with the faster;
- SASRec: training steps on real user batches, the forward and the ranking of one validation batch;
- fine-tuning: HeLLM built as the trainer builds it, but without DeepSpeed, in this process with the threads
  one rank gets; training micro-steps (forward, backward, AdamW) at the run's micro-batch on real prompts, and
  one evaluation batch. The ZeRO engine, the launcher's start-up and the ranks sharing the cores are not
  timed: ``FT_STEP_FACTOR``, ``FT_EVAL_FACTOR`` and ``FT_LAUNCH_S`` model them (calibrated on the 2-core
  development machine, ZeRO-3 on 2 CPU ranks; rough on GPUs).

Per-epoch costs follow from the data sizes: steps per epoch, evaluation batches of similar history length
(as the evaluator batches them; cost ∝ padded tokens). The budget minus what is spent (popularity, graphs,
the plan itself) and the evaluation stage's estimate is split by ``WEIGHTS`` (graph 0.3, SASRec 0.2,
fine-tuning 0.5); a stage whose default length costs less than its share gets its default and leaves the
rest to the others. Settings chosen:

- graph pre-training and SASRec: a ``time_budget`` (the recipes stop after the epoch that crosses it, validate
  it and test): half an epoch before the end of the last epoch that fits the share with its validation and the
  test;
- fine-tuning (no time budget there): ``epochs`` × ``steps_per_epoch`` — as many whole epochs as fit (≤ 20),
  or one more, shorter epoch when that trains more steps in the time left over; if not even one whole epoch
  fits, epochs such that evaluation (validation and test, every epoch) takes ≤ ``EVAL_SHARE`` of the share
  with ≥ ``MIN_FT_STEPS`` steps each, and the steps per epoch that then fit. What graph pre-training and
  SASRec leave of their shares (their epochs are whole) goes to fine-tuning too.

Accuracy (Toys, 2-core CPU, load 2–4): graph pre-training and SASRec stay within 5–18% of their estimates
(their time budgets hold them, an epoch's overshoot at most, however many epochs that is); fine-tuning has a
fixed number of steps, so a machine busier than while the plan was timed makes it run over (+24% measured).

The plan (settings, timings, estimates) is written to ``RUN/plan.json`` and reused as is by later runs whose
plan inputs (``plan_inputs``: dataset, budget, device kind, ranks, model, the explicit settings, the graph
and SASRec shapes) are the same — timed steps vary from run to run, and the stages' keys contain the settings
the plan chose, so a rerun of a finished pipeline skips every stage. Other plan inputs make a new plan (the
old file is kept as ``plan-<key>.json`` and reused when its inputs come back); to re-time with the same
inputs, delete ``RUN/plan.json`` (stages whose settings then change are refused until ``--redo``).
"""
from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from hellm_ds.errors import UsageError
from hellm_ds.pipeline import inputs_key, say  # the pipeline imports this module lazily: no cycle
from hellm_ds.utils.bench import sync
from hellm_ds.utils.io import write_json_atomic

PLAN_NAME = "plan.json"
PLAN_FORMAT = 1
CPU_BUDGET_MINUTES = 60.0
# per-stage settings: giving any of them turns the CPU default budget off (an explicit budget still applies)
STAGE_FLAGS = ("graph_epochs", "graph_time_budget", "seq_epochs", "seq_time_budget", "ft_epochs",
               "ft_steps_per_epoch")
WEIGHTS = {"graph": 0.3, "sasrec": 0.2, "finetune": 0.5}
EVAL_SHARE = 0.2  # of fine-tuning's share, at most, for validation + test every epoch (when no epoch fits)
MIN_FT_STEPS = 50  # optimiser steps per fine-tuning epoch, at least (when the data has them)
# Calibration (keys: "cpu" = several CPU ranks, "cpu1" = one CPU process, "cuda"): the trainer's optimiser
# step under DeepSpeed ÷ the plain step timed here; the same for an evaluation batch; seconds of launcher,
# imports, DeepSpeed set-up and exit. Measured on Toys, tiny model, ZeRO-3, 2 CPU ranks of 1 thread on the
# 2-core development machine under load 3–5 (the engine's hooks, gloo, two ranks sharing the cores): step
# 2.9× and 5.3× (micro-batch 8), 4.4× (64); evaluation 1.1–3.7×; 32 s outside the training loop. One CPU
# process and GPUs: rough guesses, not calibrated.
FT_STEP_FACTOR = {"cpu": 4.5, "cpu1": 1.5, "cuda": 1.5}
FT_EVAL_FACTOR = {"cpu": 2.5, "cpu1": 1.0, "cuda": 1.5}
FT_LAUNCH_S = {"cpu": 35.0, "cpu1": 10.0, "cuda": 60.0}


# ---- when a plan applies ---------------------------------------------------------------------------------
def budget_minutes(cfg, cuda: bool) -> float | None:
    """The budget of a run (None: no plan). An explicit ``budget_minutes`` > 0 always; 0 or less: none;
    unset: ``CPU_BUDGET_MINUTES`` without GPUs when no per-stage setting (``STAGE_FLAGS``) is given."""
    if cfg.budget_minutes is not None:
        return float(cfg.budget_minutes) if cfg.budget_minutes > 0 else None
    if cuda or any(getattr(cfg, f) is not None for f in STAGE_FLAGS):
        return None
    return CPU_BUDGET_MINUTES


def default_epochs() -> dict[str, int]:
    """The recipes' own epoch defaults (what an unset ``--graph-epochs`` etc. means)."""
    from hellm_ds.pretrain.train_graph import GraphTrainConfig
    from hellm_ds.pretrain.train_sasrec import SASRecTrainConfig
    from hellm_ds.train.finetune import FinetuneConfig

    recipes = (("graph_epochs", GraphTrainConfig), ("seq_epochs", SASRecTrainConfig),
               ("ft_epochs", FinetuneConfig))
    return {key: recipe.__dataclass_fields__["epochs"].default for key, recipe in recipes}


def with_default_epochs(cfg):
    """``cfg`` with every unset epoch count replaced by the recipe's default."""
    return replace(cfg, **{k: v for k, v in default_epochs().items() if getattr(cfg, k) is None})


# ---- cost models (pure: unit-testable without timing anything) --------------------------------------------
@dataclass(frozen=True)
class EpochCost:
    """A stage-1 recipe: ``epoch_s`` of training per epoch, ``valid_s`` per validation (every ``eval_every``
    epochs and after the last), ``test_s`` and ``setup_s`` once, at most ``max_epochs`` epochs."""

    epoch_s: float
    valid_s: float
    test_s: float
    setup_s: float
    eval_every: int
    max_epochs: int

    def evals(self, n: int) -> int:
        return n // self.eval_every + (1 if n % self.eval_every else 0)

    def estimate(self, n: int) -> float:
        """Seconds of a run of ``n`` epochs (each validated one ends it)."""
        return self.setup_s + n * self.epoch_s + self.evals(n) * self.valid_s + self.test_s

    def clock(self, n: int) -> float:
        """The recipe's budget clock at the end of epoch ``n``, before a validation the budget forces."""
        return n * self.epoch_s + (n // self.eval_every) * self.valid_s

    def epochs_within(self, time_budget: float | None) -> int:
        """Epochs a run with ``time_budget`` trains: up to the first whose end crosses it."""
        for n in range(1, self.max_epochs + 1):
            if time_budget is not None and self.clock(n) >= time_budget:
                return n
        return self.max_epochs

    def fit(self, seconds: float) -> tuple[int, float]:
        """(epochs, time_budget) of the longest run that fits ``seconds`` (at least one epoch)."""
        n = 1
        while n < self.max_epochs and self.estimate(n + 1) <= seconds:
            n += 1
        if n >= self.max_epochs:  # every epoch fits: the budget only guards against a slower machine
            budget = max(seconds - self.setup_s - self.valid_s - self.test_s, self.clock(n))
        else:  # half an epoch before epoch n ends: n - 1 epochs stay under it, epoch n crosses it
            budget = self.clock(n) - 0.5 * self.epoch_s
        return n, float(max(1, round(budget)))


@dataclass(frozen=True)
class StepCost:
    """Fine-tuning: ``step_s`` per optimiser step, ``full_steps`` per whole epoch (per rank), ``eval_s`` of
    validation + test per epoch, ``fixed_s`` once (launch, build, export), at most ``max_epochs``."""

    step_s: float
    full_steps: int
    eval_s: float
    fixed_s: float
    max_epochs: int

    def estimate(self, epochs: int, steps: int | None) -> float:
        s = self.full_steps if steps is None else min(steps, self.full_steps)
        return self.fixed_s + epochs * (s * self.step_s + self.eval_s)

    def choose(self, seconds: float, epochs: int | None = None, steps: int | None = None
               ) -> tuple[int, int | None]:
        """(epochs, steps_per_epoch or None for whole epochs) fitting ``seconds``; given values are kept."""
        full = self.full_steps
        if epochs is not None and steps is not None:
            return epochs, steps
        avail = seconds - self.fixed_s
        if steps is not None:
            s = min(steps, full)
            return max(1, min(self.max_epochs, math.floor(avail / (s * self.step_s + self.eval_s)))), steps
        if epochs is None:
            whole = math.floor(avail / (full * self.step_s + self.eval_s))
            if whole >= self.max_epochs:
                return self.max_epochs, None
            if whole >= 1:  # one more, shorter epoch when that trains more steps in the time left over
                more = self._steps(avail, whole + 1)
                return (whole + 1, more) if (whole + 1) * more > whole * full else (whole, None)
            epochs = max(1, min(self.max_epochs, math.floor(EVAL_SHARE * avail / max(self.eval_s, 1e-9))))
            while epochs > 1 and self._steps(avail, epochs) < min(MIN_FT_STEPS, full):
                epochs -= 1
        s = self._steps(avail, epochs)
        return epochs, (None if s >= full else s)

    def _steps(self, avail: float, epochs: int) -> int:
        return max(1, min(self.full_steps, math.floor((avail / epochs - self.eval_s) / self.step_s)))


def allocate(seconds: float, caps: dict[str, float], weights: dict[str, float] = WEIGHTS) -> dict[str, float]:
    """Split ``seconds`` between the stages of ``caps`` by ``weights``; a stage never gets more than its cap
    (its default length), and what it leaves goes to the others."""
    out, free, left = {}, [s for s in caps], max(0.0, seconds)
    while free:
        wsum = sum(weights[s] for s in free)
        capped = [s for s in free if caps[s] <= left * weights[s] / wsum]
        if not capped:
            out.update({s: left * weights[s] / wsum for s in free})
            break
        for s in capped:
            out[s] = caps[s]
            left -= caps[s]
            free.remove(s)
    return out


def decide(budget_s: float, spent_s: float, evaluate_s: float, graph: EpochCost, sasrec: EpochCost,
           ft: StepCost, explicit: dict) -> dict:
    """Settings and estimates from the cost models. ``explicit``: the user's graph_time_budget,
    seq_time_budget, ft_epochs, ft_steps_per_epoch (None = the plan's to choose). Returns
    ``{"settings": {...}, "estimates": {stage: s}, "allocated": {stage: s}}``."""
    fixed, caps, settings = {}, {}, {}
    for name, cost, key in (("graph", graph, "graph_time_budget"), ("sasrec", sasrec, "seq_time_budget")):
        if explicit.get(key) is not None:
            fixed[name] = cost.estimate(cost.epochs_within(explicit[key]))
            settings[key] = explicit[key]
        else:
            caps[name] = cost.estimate(cost.max_epochs)
    e, s = explicit.get("ft_epochs"), explicit.get("ft_steps_per_epoch")
    if e is not None and s is not None:
        fixed["finetune"] = ft.estimate(e, s)
    else:
        caps["finetune"] = ft.estimate(e or ft.max_epochs, s)
    left = budget_s - spent_s - evaluate_s - sum(fixed.values())
    alloc = allocate(left, caps)
    estimates, spare = dict(fixed), 0.0
    for name, cost, key in (("graph", graph, "graph_time_budget"), ("sasrec", sasrec, "seq_time_budget")):
        if name in alloc:
            n, settings[key] = cost.fit(alloc[name])
            estimates[name] = cost.estimate(cost.epochs_within(settings[key]))
            spare += max(0.0, alloc[name] - estimates[name])  # whole epochs leave some: fine-tuning gets it
    epochs, steps = ft.choose(alloc["finetune"] + spare, e, s) if "finetune" in alloc else (e, s)
    settings.update(ft_epochs=epochs, ft_steps_per_epoch=steps)
    estimates["finetune"] = ft.estimate(epochs, steps)
    estimates["evaluate"] = evaluate_s
    return {"settings": settings, "estimates": estimates, "allocated": alloc}


# ---- timing ----------------------------------------------------------------------------------------------
def _timed(fn, device: torch.device, warmup: int = 1, reps: int = 3, max_s: float = 15.0
           ) -> tuple[float, float]:
    """(median seconds of ``fn()`` over ``reps`` calls after ``warmup``, the first call's seconds); fewer
    calls when they are slow (at least one timed)."""
    times, first, t_start = [], None, time.perf_counter()
    for i in range(warmup + reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t
        first = dt if first is None else first
        if i >= warmup:
            times.append(dt)
            if time.perf_counter() - t_start > max_s:
                break
    return float(np.median(times)), float(first)


def _eval_seconds(dataset, split: str, batch_size: int, world: int, offset: int, user_fn, rank_fn,
                  device: torch.device) -> dict:
    """Seconds of one evaluation of ``split`` on one rank of ``world``: the evaluator's batches (rank 0's
    shard, longest histories first) costed from one timed batch from the middle — the forward ∝ padded tokens
    (history + ``offset`` prompt tokens), the ranking ∝ users."""
    from hellm_ds.data.batching import NextItemExamples, ShardedSampler

    ex = NextItemExamples(dataset, split)
    shard = ShardedSampler(len(ex), world, 0, shuffle=False, drop_last=False).indices()
    lengths = np.minimum(ex.ends - ex.starts, ex.max_len)
    shard = shard[np.argsort(-lengths[shard], kind="stable")]
    batches = [shard[i : i + batch_size] for i in range(0, shard.size, batch_size)]
    if not batches:
        return {"seconds": 0.0, "batches": 0}
    tokens = np.array([b.size * (int(lengths[b].max()) + offset) for b in batches], dtype=np.float64)
    users = np.array([b.size for b in batches], dtype=np.float64)
    mid = len(batches) // 2
    batch = {k: v.to(device) for k, v in ex.collate(batches[mid]).items()}
    with torch.no_grad():
        t_user, _ = _timed(lambda: user_fn(batch), device, warmup=1, reps=2)
        vectors = user_fn(batch)
        t_rank, _ = _timed(lambda: rank_fn(vectors, batch), device, warmup=1, reps=2)
    seconds = t_user * tokens.sum() / tokens[mid] + t_rank * users.sum() / users[mid]
    return {"seconds": float(seconds), "batches": len(batches), "forward_s": t_user, "rank_s": t_rank}


def _ranker(items: torch.Tensor, bias: torch.Tensor | None = None):
    from hellm_ds.eval.ranking import rank_targets

    return lambda u, b: rank_targets(u, items, b["targets"], b["input_ids"], bias)


def time_graph(dataset, graphs, cfg, device: torch.device, threads_to_try=(None,)) -> tuple[EpochCost, dict]:
    """MMHCL (``cfg``: the stage's GraphTrainConfig) on ``graphs``: training steps — under each of
    ``threads_to_try`` (torch CPU threads; None: as they are), leaving torch on the fastest — and a
    validation."""
    from hellm_ds.pretrain.mmhcl import MMHCL
    from hellm_ds.pretrain.train_graph import NegativeSampler

    t0 = time.perf_counter()
    model = MMHCL(graphs, cfg.model, backend=cfg.backend).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    users, items = dataset.train_interactions()
    sampler = NegativeSampler(users, items - 1, dataset.n_items)
    pu, pi = torch.from_numpy(users), torch.from_numpy(items - 1)
    gen = torch.Generator().manual_seed(cfg.seed)
    build_s = time.perf_counter() - t0

    def step():
        idx = torch.randint(0, pu.numel(), (min(cfg.batch_size, pu.numel()),), generator=gen)
        u, p = pu[idx], pi[idx]
        loss = model.loss(u.to(device), p.to(device), sampler(u, gen).to(device))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    per_threads, first_s, best = {}, None, None
    for threads in threads_to_try:
        if threads is not None:
            torch.set_num_threads(threads)
        step_s, first = _timed(step, device, reps=3 if best is None else 2)
        first_s = first if first_s is None else first_s  # the first call builds the operators
        per_threads[str(threads or torch.get_num_threads())] = step_s
        if best is None or step_s < best[1]:
            best = (threads, step_s)
    if best[0] is not None:
        torch.set_num_threads(best[0])
    step_s = best[1]
    steps = math.ceil(pu.numel() / cfg.batch_size)
    model.eval()
    emb_s, _ = _timed(model.embeddings, device, warmup=0, reps=1)
    user, item = model.embeddings()
    table = torch.cat([item.new_zeros(1, item.shape[1]), item])
    ev = _eval_seconds(dataset, "valid", cfg.eval_batch_size, 1, 0, lambda b: user[b["users"]],
                       _ranker(table), device)
    valid_s = emb_s + ev["seconds"]
    cost = EpochCost(epoch_s=steps * step_s, valid_s=valid_s, test_s=valid_s,
                     setup_s=build_s + max(0.0, first_s - step_s), eval_every=cfg.eval_every,
                     max_epochs=cfg.epochs)
    return cost, {"step_s": step_s, "step_s_by_threads": per_threads, "steps_per_epoch": steps,
                  "propagation_s": emb_s, **_prefixed("eval_", ev)}


def time_sasrec(dataset, cfg, device: torch.device) -> tuple[EpochCost, dict]:
    """SASRec (``cfg``: the stage's SASRecTrainConfig): training steps on real batches, a validation."""
    from hellm_ds.pretrain.train_sasrec import _sequence_loss, _TrainSequences, build_model

    t0 = time.perf_counter()
    model = build_model(dataset.n_items, cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = _TrainSequences(dataset)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(cfg.seed)
    model.train()

    def step():
        x, y = data.batch(rng.choice(len(data), min(cfg.batch_size, len(data)), replace=False))
        loss, _ = _sequence_loss(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_s, first_s = _timed(step, device)
    steps = math.ceil(len(data) / cfg.batch_size)
    model.eval()
    with torch.no_grad():
        ev = _eval_seconds(dataset, "valid", cfg.eval_batch_size, 1, 0, model.user_vectors,
                           _ranker(model.item_embeddings()), device)
    cost = EpochCost(epoch_s=steps * step_s, valid_s=ev["seconds"], test_s=ev["seconds"],
                     setup_s=build_s + max(0.0, first_s - step_s), eval_every=cfg.eval_every,
                     max_epochs=cfg.epochs)
    return cost, {"step_s": step_s, "steps_per_epoch": steps, **_prefixed("eval_", ev)}


def time_finetune(dataset, fcfg, ranks: int, device: torch.device, graph_dim: int, seq_dim: int
                  ) -> tuple[StepCost, float, dict]:
    """HeLLM as ``hellm_ds.train.finetune`` builds it (``fcfg``: its FinetuneConfig), without DeepSpeed, with
    one rank's threads: micro-steps, an evaluation batch. Returns (fine-tuning cost, the evaluation stage's
    seconds, details)."""
    from hellm_ds.data.batching import training_examples
    from hellm_ds.llm.model import build_hellm, next_item_loss
    from hellm_ds.train.finetune import load_ds_config, param_groups, resolve_model

    kind = "cuda" if device.type == "cuda" else ("cpu" if ranks > 1 else "cpu1")
    ds = load_ds_config(fcfg, device)
    micro, gas = int(ds["train_micro_batch_size_per_gpu"]), int(ds["gradient_accumulation_steps"])
    hcfg, _ = resolve_model(fcfg, ds, device)
    g = torch.randn(dataset.n_items + 1, graph_dim) * 0.1
    s = torch.randn(dataset.n_items + 1, seq_dim) * 0.1
    t0 = time.perf_counter()
    model = build_hellm(hcfg, g, s, device=device, seed=fcfg.seed)
    build_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(param_groups(model, fcfg.weight_decay), lr=fcfg.lr,
                            betas=(fcfg.beta1, fcfg.beta2))
    train = training_examples(dataset, fcfg.objective, fcfg.max_len)
    rng = np.random.default_rng(fcfg.seed)
    clip = ds.get("gradient_clipping")
    model.train()

    def micro_step():
        idx = rng.choice(len(train), min(micro, len(train)), replace=False)
        batch = {k: v.to(device) for k, v in train.collate(idx).items()}
        loss = next_item_loss(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()

    micro_s, _ = _timed(micro_step, device, warmup=1, reps=4)
    full = len(train) // ranks // micro // gas
    model.eval()
    with torch.no_grad():
        W, b = model.item_scoring()
        prompt = int(model.instruction_ids.numel() + model.response_ids.numel())
        ev = _eval_seconds(dataset, "valid", fcfg.eval_batch_size, ranks, prompt,
                           lambda batch: model.user_vectors(batch).float(), _ranker(W, b), device)
        ev1 = ev if ranks == 1 else _eval_seconds(dataset, "valid", 256, 1, prompt,
                                                   lambda batch: model.user_vectors(batch).float(),
                                                   _ranker(W, b), device)
    step_s = FT_STEP_FACTOR[kind] * gas * micro_s
    cost = StepCost(step_s=step_s, full_steps=max(1, full), eval_s=2 * FT_EVAL_FACTOR[kind] * ev["seconds"],
                    fixed_s=FT_LAUNCH_S[kind] + build_s, max_epochs=fcfg.epochs)
    evaluate_s = build_s + 2 * ev1["seconds"]  # the export reloaded in one plain process, valid + test
    info = {"micro_batch": micro, "grad_accum": gas, "micro_step_plain_s": micro_s, "build_s": build_s,
            "step_factor": FT_STEP_FACTOR[kind], "eval_factor": FT_EVAL_FACTOR[kind],
            "launch_s": FT_LAUNCH_S[kind], "steps_per_epoch": full, **_prefixed("eval_", ev)}
    return cost, evaluate_s, info


def _prefixed(prefix: str, d: dict) -> dict:
    return {prefix + k: v for k, v in d.items()}


# ---- the plan --------------------------------------------------------------------------------------------
def plan_inputs(cfg, dataset, budget_min: float, cuda: bool, ranks: int, model: str, scope: str, head: str,
                ds_json: str) -> dict:
    """What a plan depends on: a recorded plan is reused exactly when these are equal."""
    keep = ("max_len", "knn_k", "graph_preset", "graph_epochs", "graph_eval_every", "graph_batch_size",
            "graph_time_budget", "seq_epochs", "seq_eval_every", "seq_time_budget", "ft_epochs",
            "ft_micro_batch", "ft_steps_per_epoch", "objective", "prompt")
    return {"format": PLAN_FORMAT, "dataset": dataset.fingerprint, "budget_minutes": budget_min,
            "device": "cuda" if cuda else "cpu", "ranks": ranks, "model": model, "trainable_scope": scope,
            "item_head": head, "deepspeed_config": ds_json, **{k: getattr(cfg, k) for k in keep}}


def recorded_plan(root: Path, inputs: dict) -> dict | None:
    """The plan recorded in ``root`` for ``inputs``: ``plan.json``, or an earlier ``plan-<key>.json``."""
    key = inputs_key(inputs)
    for p in (root / PLAN_NAME, root / f"plan-{key[:16]}.json"):
        try:
            plan = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(plan, dict) and plan.get("key") == key:
            return plan
    return None


def record_plan(root: Path, plan: dict) -> None:
    """Write ``plan`` as ``root/plan.json``, keeping a different one there as ``plan-<its key>.json``."""
    cur = root / PLAN_NAME
    try:
        old = json.loads(cur.read_text())
        if isinstance(old, dict) and old.get("key") and old["key"] != plan["key"]:
            write_json_atomic(root / f"plan-{old['key'][:16]}.json", old)
    except (OSError, ValueError):
        pass
    write_json_atomic(cur, plan)


def thread_options(threads: int) -> tuple[int, ...]:
    """CPU threads to try for the in-process stages (graph, SASRec, evaluate); the faster wins. When other
    processes keep the cores busy, one thread only: there, two threads on a 2-core machine were 3–6× slower
    than one (measured on Toys, load 3–5: graph step 3.1 s vs 0.63 s), and a moment of quiet during the
    timing (two threads then 1.7× faster) does not last."""
    if threads <= 1:
        return (1,)
    try:
        others = max(0.0, os.getloadavg()[0] - 1.0)  # the 1-minute load, less this process
    except OSError:
        others = 0.0
    return (1,) if others + threads > (os.cpu_count() or 1) + 0.5 else (1, threads)


def make_plan(*, inputs: dict, budget_min: float, dataset, graphs, graph_cfg, seq_cfg, fcfg, ranks: int,
              spent: dict[str, float], explicit: dict) -> dict:
    """Time the stages (see the module docstring) and decide. ``spent``: seconds already used by the stages
    run before the plan; ``explicit``: the user's graph_time_budget, seq_time_budget, ft_epochs,
    ft_steps_per_epoch (None: the plan's to choose)."""
    from hellm_ds.utils.device import resolve_device

    t0 = time.perf_counter()
    cuda = inputs["device"] == "cuda"
    threads = torch.get_num_threads()
    options = thread_options(threads) if not cuda else (None,)
    timings: dict = {}
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
            g_cost, timings["graph"] = time_graph(dataset, graphs, graph_cfg,
                                                  resolve_device(graph_cfg.device), options)
            chosen = torch.get_num_threads()
            s_cost, timings["sasrec"] = time_sasrec(dataset, seq_cfg, resolve_device(seq_cfg.device))
            ft_device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
            if not cuda:  # one rank's threads, as hellm_ds.train.launch gives them
                torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS")
                                          or max(1, (os.cpu_count() or 1) // ranks)))
            f_cost, evaluate_s, timings["finetune"] = time_finetune(
                dataset, fcfg, ranks, ft_device, graph_cfg.model.dim, seq_cfg.dim)
    except torch.cuda.OutOfMemoryError:
        raise UsageError("the plan could not time a fine-tuning step in one process (out of GPU memory); "
                         "give --ft-epochs and --ft-steps-per-epoch, or --budget-minutes 0") from None
    finally:
        torch.set_num_threads(threads)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    plan_s = time.perf_counter() - t0
    spent = {**spent, "plan": plan_s}
    d = decide(budget_min * 60, sum(spent.values()), evaluate_s, g_cost, s_cost, f_cost, explicit)
    costs = {"graph": asdict(g_cost), "sasrec": asdict(s_cost), "finetune": asdict(f_cost),
             "evaluate_s": evaluate_s}
    return {"key": inputs_key(inputs), "inputs": inputs, "budget_minutes": budget_min,
            "plan_seconds": round(plan_s, 2),
            "threads": None if cuda else chosen,
            "spent": {k: round(v, 2) for k, v in spent.items()}, "settings": d["settings"],
            "explicit": sorted(k for k, v in explicit.items() if v is not None),
            "estimates": {k: round(v, 1) for k, v in d["estimates"].items()},
            "allocated": {k: round(v, 1) for k, v in d["allocated"].items()},
            "what": _what(d["settings"], g_cost, s_cost, f_cost, timings, ranks, inputs, explicit),
            "costs": costs, "timings": timings,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_average": _load()}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _what(settings: dict, g: EpochCost, s: EpochCost, f: StepCost, timings: dict, ranks: int, inputs: dict,
          explicit: dict) -> dict:
    def yours(key):
        return " (your setting)" if explicit.get(key) is not None else ""

    gb, sb = settings["graph_time_budget"], settings["seq_time_budget"]
    ft = timings["finetune"]
    steps = settings["ft_steps_per_epoch"]
    per = f"{min(steps, f.full_steps)} of {f.full_steps}" if steps is not None else f"all {f.full_steps}"
    return {
        "graph": f"MMHCL: ~{g.epochs_within(gb)} epochs of {timings['graph']['steps_per_epoch']} steps "
                 f"({g.epoch_s:.0f} s each), time budget {gb:.0f} s{yours('graph_time_budget')}",
        "sasrec": f"SASRec: ~{s.epochs_within(sb)} epochs of {timings['sasrec']['steps_per_epoch']} steps "
                  f"({s.epoch_s:.0f} s each), time budget {sb:.0f} s{yours('seq_time_budget')}",
        "finetune": f"HeLLM {inputs['model']} ({inputs['trainable_scope']}, {inputs['item_head']} head), "
                    f"{ranks} rank{'s' if ranks > 1 else ''} × micro-batch {ft['micro_batch']}: "
                    f"{settings['ft_epochs']} epochs{yours('ft_epochs')} × {per} steps"
                    f"{yours('ft_steps_per_epoch')} (~{f.step_s:.2f} s each)",
        "evaluate": "the export reloaded, valid + test",
    }


def format_plan(plan: dict, reused: bool) -> str:
    budget = plan["budget_minutes"]
    head = (f"plan for a {budget:g}-minute budget ({plan['inputs']['device'].upper()}"
            + (", recorded in plan.json, reused" if reused else f", timed in {plan['plan_seconds']:.0f} s")
            + (f"; graph, SASRec and evaluate on {plan['threads']} CPU "
               f"thread{'s' if plan['threads'] > 1 else ''}" if plan.get("threads") else "")
            + "); --budget-minutes 0 runs the epoch defaults instead")
    rows = [(k, "done before the plan" if k != "plan" else "timing a few steps of each stage", v)
            for k, v in plan["spent"].items()]
    rows += [(k, plan["what"][k], plan["estimates"][k]) for k in ("graph", "sasrec", "finetune", "evaluate")]
    total = sum(r[2] for r in rows)
    lines = [head, f"  {'stage':<11} {'min':>6}  what"]
    lines += [f"  {k:<11} {v / 60:6.1f}  {w}" for k, w, v in rows]
    over = total > budget * 60 * 1.001
    lines.append(f"  {'total':<11} {total / 60:6.1f}  of {budget:g}"
                 + ("  — over budget: even the shortest runs do not fit" if over else ""))
    return "\n".join(lines)


def apply_plan(cfg, *, dataset, root: Path, cuda: bool, ranks: int, model: str, scope: str, head: str,
               ds_json: str, graphs, spent: dict[str, float]):
    """``(cfg with every stage setting resolved, plan or None)``. ``graphs``: a callable returning the cached
    hypergraphs (only called when a plan is timed); ``spent``: seconds of the stages already run."""
    from hellm_ds.pipeline import graph_train_config, sasrec_train_config
    from hellm_ds.train.finetune import FinetuneConfig

    budget = budget_minutes(cfg, cuda)
    if budget is None:
        return with_default_epochs(cfg), None
    explicit = {k: getattr(cfg, k) for k in ("graph_time_budget", "seq_time_budget", "ft_epochs",
                                             "ft_steps_per_epoch")}
    inputs = plan_inputs(cfg, dataset, budget, cuda, ranks, model, scope, head, ds_json)
    plan = recorded_plan(root, inputs)
    reused = plan is not None
    if plan is None:
        say(f"planning for a {budget:g}-minute budget: timing a few steps of each stage …")
        base = with_default_epochs(cfg)
        fcfg = FinetuneConfig(data=cfg.data, graph_emb="", seq_emb="", out="", model=model,
                              deepspeed_config=cfg.deepspeed_config, epochs=base.ft_epochs,
                              micro_batch_size=cfg.ft_micro_batch, max_len=cfg.max_len, trainable_scope=scope,
                              item_head=head, objective=cfg.objective, prompt=cfg.prompt, seed=cfg.seed)
        plan = make_plan(inputs=inputs, budget_min=budget, dataset=dataset, graphs=graphs(),
                         graph_cfg=graph_train_config(base), seq_cfg=sasrec_train_config(base), fcfg=fcfg,
                         ranks=ranks, spent=spent, explicit=explicit)
        record_plan(root, plan)
    print(format_plan(plan, reused), file=sys.stderr, flush=True)
    return replace(with_default_epochs(cfg), **plan["settings"]), plan


def plan_report(plan: dict | None, seconds: dict[str, float]) -> dict | None:
    """The plan for the result JSON: per stage the estimate next to the measured seconds."""
    if plan is None:
        return None
    stages = {k: {"estimate_s": v, "seconds": seconds.get(k)} for k, v in plan["spent"].items()}
    for k in ("graph", "sasrec", "finetune", "evaluate"):
        stages[k] = {"what": plan["what"][k], "estimate_s": plan["estimates"][k], "seconds": seconds.get(k)}
    measured = [v["seconds"] for v in stages.values() if v["seconds"] is not None]
    return {"budget_minutes": plan["budget_minutes"], "settings": plan["settings"],
            "explicit": plan["explicit"],
            "plan_seconds": plan["plan_seconds"], "created": plan["created"],
            "load_average": plan["load_average"], "stages": stages,
            "estimate_s": round(sum(v["estimate_s"] for v in stages.values()), 1),
            "seconds": round(sum(measured), 1) if len(measured) == len(stages) else None}


def format_report(report: dict) -> str:
    lines = [f"plan vs run (minutes; budget {report['budget_minutes']:g}):"]
    for k, v in report["stages"].items():
        got = "–" if v["seconds"] is None else f"{v['seconds'] / 60:.1f}"
        lines.append(f"  {k:<11} estimated {v['estimate_s'] / 60:6.1f}   took {got:>6}")
    return "\n".join(lines)
