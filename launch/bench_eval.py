"""Benchmark full-ranking evaluation: the project's evaluator vs a per-user loop like the authors' code.

Every user of a dataset is ranked against the whole catalogue, for both splits (valid, test) and both
protocols (``paper``: nothing masked; ``filtered``: the user's input history masked), with user/item vectors
of width ``--dim``:

- ``project``   ``hellm_ds.eval.evaluator.evaluate`` (batches of ``--batch-size`` users, item-chunked
  ``u · Vᵀ`` with the rank counted in the chunk, history masked by one scatter; never a users × items matrix),
  timed on ALL users of both splits;
- ``baseline``  what the HeLLM authors' evaluation does: one user at a time, a dense score vector
  ``V · u`` over the catalogue, the padding item and (``filtered``) each history item set to -inf in a
  Python loop, ``torch.topk`` (k = 20) per user and protocol, metrics from the target's position in the
  top-k list in Python. It is timed on a seeded random subset of ``--baseline-users`` users (both splits) and
  its time EXTRAPOLATED to all users (seconds per ranked user × users); the JSON and table say so.

Correctness guard (fails loudly: exit status 1, after the JSON is written): on the same subset, the project's
``evaluate`` (run on a sub-dataset holding just those users) must give the same metrics as the baseline
(|Δ| ≤ 1e-9 for Recall/NDCG/MRR/Precision/MAP @5/10/20, both protocols and splits), and for every subset user
the baseline's top-k position of the target must equal the project's rank whenever either is < 20.

Vectors: ``--graph-emb FILE`` reads an exported graph embedding (a safetensors with ``user`` [users + 1, d]
and ``item`` [items + 1, d], row 0 padding, as ``hellm-ds pretrain-graph`` writes). Otherwise they are random
and seeded (``--seed``): item vectors N(0, 1/d), and each user's vector is the mean of its history's item
vectors plus a planted pull towards its two held-out items, so that hits are common and the guard compares
metrics that are far from zero (timings do not depend on the values).

Run (CPU, default: a synthesised Toys-shaped dataset, about a minute on 2 cores)::

    OMP_NUM_THREADS=1 python launch/bench_eval.py
    OMP_NUM_THREADS=1 python launch/bench_eval.py --data ../shared/data/toys --device cpu

Options: ``--data DIR`` (default: ``hellm_ds.data.synth`` into a temporary directory, ``--synth-users``
20000 × ``--synth-items`` 12000), ``--dim 64``, ``--graph-emb FILE``, ``--device auto|cpu|cuda[:N]``,
``--ties expected|optimistic`` (the evaluator's tie rule, recorded; default ``expected``), ``--dtype fp32|bf16``
(vectors rounded to this dtype before both paths score them; both score in fp32, the evaluator's ranking
dtype, so bf16 only creates ties: their mean count per target is reported as ``mean_ties``),
``--batch-size 1024`` (project), ``--baseline-users 500``, ``--max-len 50``, ``--seed 0``, ``--threads N``,
``--out FILE`` (default ``runs/bench/eval.json``), ``--quiet``; ``--checkpoint OUT`` (model mode; ``--max-len``
then defaults to the run's), ``--tolerance`` (default 1e-9, model mode 1e-5).

Model mode, ``--checkpoint OUT`` (a fine-tuning run's output directory holding ``hellm_adapter.safetensors`` /
``.json``; ``--data`` must be the run's dataset, loaded with the run's ``max_len`` unless ``--max-len`` is
given). This is what the authors' ≈14 min per evaluation are spent on: one LLM forward pass per user.

- ``project``   exactly ``hellm-ds evaluate`` (``hellm_ds.eval.checkpoint.evaluate_checkpoint``): the item
  table and bias from ``HeLLM.item_scoring`` once, then ``evaluate`` over every user of both splits with
  ``--batch-size`` users per LLM forward (``HeLLM.user_vectors``) and the chunked factorised ranking above;
- ``baseline``  the authors' loop: one user per forward pass (batch size 1) computing the full logits
  ``model(batch)`` (``HeLLM.forward``: [1, n_items + 1], padding column −∞), the history masked item by item in
  Python (``filtered``), ``torch.topk`` per user and protocol; timed on ``--baseline-users`` users per split
  (after one untimed warm-up forward) and EXTRAPOLATED to all users, as above.

Both exclude loading the model (reported separately). The guard is the same, with the tolerance on the
metrics relaxed to 1e-5 (``--tolerance``): the LLM forward runs at batch size 1 vs ``--batch-size`` (other
padding, other BLAS blocking), so fp32 scores differ in the last bits; the per-user top-k positions must
still be identical (a near-tie flip within ~1e-5 would fail the guard: the JSON records the largest score
gap between the two paths, ``max_abs_target_score_diff``, to judge it). A low-precision (bf16/fp16) export
needs a larger ``--tolerance`` and can flip ranks; the guard says so rather than hiding it.

    OMP_NUM_THREADS=1 python launch/bench_eval.py --checkpoint /tmp/ft/toys_tied --data ../shared/data/toys \
        --device cpu --baseline-users 300 --batch-size 256

Ties: when targets tie with other items (``--dtype bf16``, a collapsed model) the per-user loop's
``torch.topk`` orders them arbitrarily, so the guard then checks that its top-k position lies in the
evaluator's tie interval ``[h, h + t]`` (``h`` items scored above the target, ``t`` tied with it), and the
metric comparison is reported but not required (the evaluator's metrics are expectations over tie orders,
or optimistic); ``summary.guard.tied_targets`` counts them.

The JSON has the shape of the other benchmarks (``hellm_ds.utils.bench.write_bench_json``): a header
(``benchmark``, ``date``, ``device``, ``torch``, ``config``, ``data``, ...), ``results`` (one record per method:
``name``, ``params``, ``metrics``, ``status``, ``note``) and ``summary`` (``speedup``, ``correct``, the guard's
details, and the project's metrics on all users).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib.util
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# a plain checkout (not installed): its two source roots, the repository (hellm_ds) and kernels/ (hellm_kernels),
# each added only when that package is not importable already
for _name, _src in (("hellm_ds", REPO_ROOT), ("hellm_kernels", REPO_ROOT / "kernels")):
    if importlib.util.find_spec(_name) is None:
        sys.path.append(str(_src))

from hellm_ds.utils.bench import command_line, device_name, fmt_cell, max_rss_mb, sync  # noqa: E402

from hellm_ds.data.batching import NextItemExamples
from hellm_ds.data.dataset import Dataset, load_dataset
from hellm_ds.eval.evaluator import evaluate
from hellm_ds.eval.metrics import DEFAULT_KS, METRICS
from hellm_ds.eval.ranking import PROTOCOLS, rank_targets
from hellm_ds.utils.cli_args import add_ties_arg

SPLITS = ("valid", "test")
TOPK = max(DEFAULT_KS)
TOLERANCE = 1e-9
VECTOR_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODEL_TOLERANCE = 1e-5  # model mode: fp32 LLM forward at batch size 1 vs --batch-size
PLANT = 0.4  # weight of the pull towards the held-out items in the random user vectors


# ---- data and vectors -------------------------------------------------------------------------------------
def subset_dataset(ds: Dataset, users: np.ndarray) -> Dataset:
    """The dataset restricted to ``users`` (sorted internal indices), same catalogue: evaluating it ranks
    exactly those users. Its internal user ``j`` is ``users[j]`` of ``ds``."""
    users = np.asarray(users, dtype=np.int64)
    lens = ds.lengths[users]
    offsets = np.zeros(users.size + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    idx = np.repeat(ds.offsets[users] - offsets[:-1], lens) + np.arange(int(lens.sum()), dtype=np.int64)
    return dataclasses.replace(ds, user_ids=ds.user_ids[users].copy(), offsets=offsets, items=ds.items[idx].copy(),
                               n_interactions=int(lens.sum()))


def random_vectors(ds: Dataset, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(user [n_users, dim], item [n_items + 1, dim], row 0 zero), float32, seeded; see the module doc."""
    g = torch.Generator().manual_seed(seed)
    item = torch.randn(ds.n_items + 1, dim, generator=g) / math.sqrt(dim)
    item[0] = 0
    # mean of each user's training items (the history both splits read, minus the held-out ones)
    start, end = ds.offsets[:-1], ds.train_end
    n = np.maximum(end - start, 0)
    rows = np.repeat(np.arange(ds.n_users), n)
    pos = np.repeat(start - np.cumsum(n) + n, n) + np.arange(int(n.sum()))
    user = torch.zeros(ds.n_users, dim)
    user.index_add_(0, torch.from_numpy(rows), item[torch.from_numpy(ds.items[pos])])
    user /= torch.from_numpy(np.maximum(n, 1)).float()[:, None]
    for split in SPLITS:  # the planted pull: users with ≥ 3 items have held-out targets
        s = ds.split(split)
        user[torch.from_numpy(s.users.copy())] += PLANT * item[torch.from_numpy(s.targets.copy())]
    user += 0.3 * torch.randn(ds.n_users, dim, generator=g) / math.sqrt(dim)
    return user.contiguous(), item


def graph_vectors(path: str, ds: Dataset) -> tuple[torch.Tensor, torch.Tensor, str]:
    from hellm_ds.utils.checkpoint import load_tensors

    t, meta = load_tensors(path, {"user": (ds.n_users + 1, None), "item": (ds.n_items + 1, None)})
    if t["user"].shape[1] != t["item"].shape[1]:
        raise SystemExit(f"bench_eval.py: error: {path}: user and item widths differ "
                         f"({t['user'].shape[1]} vs {t['item'].shape[1]})")
    if "user_ids" in t and not np.array_equal(t["user_ids"].numpy(), ds.user_ids):
        raise SystemExit(f"bench_eval.py: error: {path} was exported for other users than {ds.root}'s")
    fp = meta.get("dataset") if isinstance(meta, dict) else None
    note = "" if fp in (None, ds.fingerprint) else f"{path} records another dataset fingerprint; shapes match"
    return t["user"][1:].float().contiguous(), t["item"].float().contiguous(), note


# ---- the baseline: one user at a time (the authors' evaluation loop) -------------------------------------
def _baseline_loop(ds: Dataset, split: str, users: np.ndarray, score_fn: Callable[[int, int], torch.Tensor]
                   ) -> tuple[dict, dict[str, list[int]], list[float]]:
    """The per-user loop over ``users`` (internal indices of ``ds`` with a held-out item): ``score_fn(w, u)``
    gives a fresh dense score vector over the catalogue for the split's example ``w`` (user ``u``). Returns
    the metrics, each user's top-k position and the target's score."""
    s = ds.split(split)
    where = np.searchsorted(s.users, users)
    sums = {p: {f"{m}@{k}": 0.0 for m in METRICS for k in DEFAULT_KS} for p in PROTOCOLS}
    positions: dict[str, list[int]] = {p: [] for p in PROTOCOLS}
    target_scores: list[float] = []
    for w in where:
        u = int(s.users[w])
        target = int(s.targets[w])
        history = ds.items[max(s.hist_start[w], s.hist_end[w] - ds.max_len): s.hist_end[w]].tolist()
        scores = score_fn(int(w), u)  # a dense score per catalogue item
        scores[0] = -math.inf  # padding
        target_scores.append(float(scores[target]))
        for proto in PROTOCOLS:
            if proto == "filtered":
                scores = scores.clone()
                for it in history:  # python-level masking, one item at a time
                    scores[it] = -math.inf
            top = torch.topk(scores, TOPK).indices.tolist()
            r = top.index(target) if target in top else TOPK
            positions[proto].append(r)
            for k in DEFAULT_KS:
                if r < k:
                    sums[proto][f"Recall@{k}"] += 1.0
                    sums[proto][f"NDCG@{k}"] += 1.0 / math.log2(r + 2)
                    sums[proto][f"MRR@{k}"] += 1.0 / (r + 1)
                    sums[proto][f"Precision@{k}"] += 1.0 / k
                    sums[proto][f"MAP@{k}"] += 1.0 / (r + 1)
    n = max(len(users), 1)
    return {p: {m: v / n for m, v in ms.items()} for p, ms in sums.items()}, positions, target_scores


def baseline_eval(ds: Dataset, split: str, user: torch.Tensor, item: torch.Tensor, users: np.ndarray,
                  device: torch.device) -> tuple[dict, dict[str, list[int]]]:
    """Metrics ``{protocol: {metric@k: mean}}`` over ``users`` (internal indices of ``ds`` with a held-out
    item), and each user's 0-based top-k position of the target (``TOPK`` = not in the top-k)."""
    dtype = torch.promote_types(item.dtype, torch.float32)  # the evaluator's ranking dtype (fp32 at least)
    item_d = item.to(device, dtype)
    user_d = user.to(device, dtype)
    metrics, positions, _ = _baseline_loop(ds, split, users, lambda w, u: item_d @ user_d[u])
    return metrics, positions


@torch.no_grad()
def baseline_model_eval(ds: Dataset, split: str, model, users: np.ndarray, device: torch.device
                        ) -> tuple[dict, dict[str, list[int]], list[float]]:
    """The authors' loop with the LLM: per user, a batch of one through ``model(batch)`` (full logits
    [1, n_items + 1] in fp32), then masking and top-k as in ``baseline_eval``. Also returns the targets'
    scores."""
    examples = NextItemExamples(ds, split)

    def scores(w: int, u: int) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in examples.collate([w]).items()}
        return model(batch)[0]

    return _baseline_loop(ds, split, users, scores)


def project_ranks(ds: Dataset, split: str, user: torch.Tensor, item: torch.Tensor, users: np.ndarray,
                  device: torch.device) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """The evaluator's own ranking function on the subset, for the per-user comparison: ``(h, t)`` per
    protocol (items above the target, items tied with it)."""
    ex = NextItemExamples(ds, split)
    where = np.searchsorted(ds.split(split).users, users)
    batch = ex.collate(where)
    ranks = rank_targets(user.to(device)[batch["users"].to(device)], item.to(device),
                         batch["targets"].to(device), batch["input_ids"].to(device))
    return ({p: ranks[p].cpu().tolist() for p in PROTOCOLS},
            {p: ranks["ties"][p].cpu().tolist() for p in PROTOCOLS})


def compare(project: dict, baseline: dict) -> float:
    diff = 0.0
    for split in SPLITS:
        for p in PROTOCOLS:
            for m, v in baseline[split][p].items():  # the project's results also carry mean_ties
                diff = max(diff, abs(project[split][p][m] - v))
    return diff


# ---- measurement -----------------------------------------------------------------------------------------
def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return max_rss_mb(), "cpu_max_rss_cumulative"


def run_project(ds: Dataset, user: torch.Tensor, item: torch.Tensor, batch_size: int,
                device: torch.device, ties: str = "expected") -> tuple[dict, float]:
    """``{split: {protocol: metrics}}`` of every user and the seconds it took (vectors already on device)."""
    sync(device)
    t0 = time.perf_counter()
    res = {s: evaluate(ds, s, lambda b: user[b["users"]], item_vectors=item, batch_size=batch_size,
                       device=device, progress=False, ties=ties) for s in SPLITS}
    sync(device)
    return res, time.perf_counter() - t0


def run_model_project(ds: Dataset, model, batch_size: int, device: torch.device,
                      capture: dict | None = None, ties: str = "expected") -> tuple[dict, float]:
    """``evaluate_checkpoint``'s work after loading, timed: ``item_scoring`` once, then ``evaluate`` of both
    splits with batched ``user_vectors``. ``capture`` (the guard's subset run) collects, per split, each
    batch's ``(targets, input_ids, user vectors)`` and the item table/bias for the per-user comparison."""
    sync(device)
    t0 = time.perf_counter()
    W, b = model.item_scoring()
    res = {}
    for split in SPLITS:
        def user_fn(batch: dict, split: str = split) -> torch.Tensor:
            u = model.user_vectors(batch).float()
            if capture is not None:
                capture.setdefault(split, []).append((batch["users"], batch["targets"], batch["input_ids"], u))
            return u

        res[split] = evaluate(ds, split, user_fn, item_vectors=W, item_bias=b, batch_size=batch_size,
                              device=device, progress=False, ties=ties)
    sync(device)
    seconds = time.perf_counter() - t0
    if capture is not None:
        capture["scoring"] = (W.to(device), b.to(device))
    return res, seconds


def captured_ranks(capture: dict, split: str
                   ) -> tuple[dict[str, list[int]], dict[str, list[int]], list[float]]:
    """The evaluator's ranks (``rank_targets``) of the captured user vectors and the targets' scores
    ``u · W[t] + b[t]``, in user order (the evaluator batches users by history length)."""
    W, b = capture["scoring"]
    users, scores, ranks, ties = [], [], {p: [] for p in PROTOCOLS}, {p: [] for p in PROTOCOLS}
    for batch_users, targets, history, u in capture[split]:
        r = rank_targets(u, W, targets, history, b)
        for p in PROTOCOLS:
            ranks[p] += r[p].cpu().tolist()
            ties[p] += r["ties"][p].cpu().tolist()
        scores += ((u * W[targets]).sum(-1) + b[targets]).cpu().tolist()
        users += batch_users.cpu().tolist()
    order = np.argsort(users, kind="stable")
    return ({p: [v[i] for i in order] for p, v in ranks.items()},
            {p: [v[i] for i in order] for p, v in ties.items()}, [scores[i] for i in order])


def table(records: list[dict]) -> str:
    lines = [(f"{'method':<9} {'status':<6} {'users timed':>11} {'s (all users)':>14} {'users/s':>10} "
              f"{'ms/user':>8} {'peak MB':>8}  note")]
    for r in records:
        m = r["metrics"]
        lines.append(f"{r['name']:<9} {r['status']:<6} {fmt_cell(m.get('users_measured'), '11,d')} "
                     f"{fmt_cell(m.get('seconds'), '14.3f')} {fmt_cell(m.get('users_per_s'), '10.0f')} "
                     f"{fmt_cell(m.get('ms_per_user'), '8.3f')} {fmt_cell(m.get('peak_mem_mb'), '8.0f')}  {r['note']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_eval.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="dataset directory (default: a synthesised one in a temp dir)")
    ap.add_argument("--synth-users", type=int, default=20000, help="users of the default synthetic dataset")
    ap.add_argument("--synth-items", type=int, default=12000, help="items of the default synthetic dataset")
    ap.add_argument("--max-len", type=int, default=None,
                    help="history length (default 50; with --checkpoint the run's)")
    ap.add_argument("--dim", type=int, default=64, help="vector width of the random vectors")
    ap.add_argument("--graph-emb", default=None, help="exported graph embedding (safetensors: user, item)")
    ap.add_argument("--checkpoint", default=None,
                    help="model mode: a fine-tuning run's output directory (hellm_adapter.*); needs --data")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--batch-size", type=int, default=1024, help="users per batch of the project's evaluator")
    ap.add_argument("--baseline-users", type=int, default=500,
                    help="users the per-user baseline is timed on (per split); extrapolated to all")
    ap.add_argument("--tolerance", type=float, default=None,
                    help=f"guard's max |Δ metric| (default {TOLERANCE}; model mode {MODEL_TOLERANCE})")
    add_ties_arg(ap)
    ap.add_argument("--dtype", choices=sorted(VECTOR_DTYPES), default="fp32",
                    help="round the user/item vectors to this dtype first (data mode; both paths score in fp32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default="runs/bench/eval.json")
    ap.add_argument("--quiet", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.command = command_line(__file__, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    dev = "cpu" if dev == "auto" else dev
    device = torch.device(dev)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_eval.py: error: --device cuda but torch sees no GPU")
    if args.dim < 1 or args.batch_size < 1 or args.baseline_users < 1:
        raise SystemExit("bench_eval.py: error: --dim, --batch-size and --baseline-users must be ≥ 1")
    if args.tolerance is not None and not args.tolerance >= 0:
        raise SystemExit("bench_eval.py: error: --tolerance must be ≥ 0")

    def log(s: str) -> None:
        if not args.quiet:
            print(s, flush=True)

    if args.checkpoint is not None:
        return _main_model(args, device, log)
    if args.max_len is None:
        args.max_len = 50
    tmp = None
    if args.data is None:
        from hellm_ds.data.synth import SynthConfig, write_synthetic

        tmp = tempfile.TemporaryDirectory(prefix="bench_eval_")
        t0 = time.perf_counter()
        data_dir = write_synthetic(Path(tmp.name) / "data",
                                   SynthConfig(users=args.synth_users, items=args.synth_items, seed=args.seed))
        log(f"# synthesised {args.synth_users} users × {args.synth_items} items in "
            f"{time.perf_counter() - t0:.1f} s")
        source = f"synthetic (hellm_ds.data.synth, users={args.synth_users}, items={args.synth_items}, " \
                 f"seed={args.seed})"
    else:
        data_dir, source = Path(args.data), str(args.data)
    try:
        ds = load_dataset(data_dir, max_len=args.max_len)
        return _run(args, ds, source, device, log)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _prepare(args, ds: Dataset, notes: list[str]) -> tuple[int, np.ndarray]:
    """(evaluated users per split, the baseline's seeded user subset)."""
    n_eval = len(ds.split("valid"))
    if n_eval == 0:
        raise SystemExit(f"bench_eval.py: error: {ds.root} has no user with ≥ 3 items to evaluate")
    if ds.n_items < TOPK + ds.max_len:
        notes.append(f"catalogue of {ds.n_items} items < top-k {TOPK} + max_len {ds.max_len}: the baseline's "
                     "top-k may contain masked items")
    rng = np.random.default_rng(args.seed)
    eval_users = ds.split("valid").users  # the same users in both splits
    return n_eval, np.sort(rng.choice(eval_users, size=min(args.baseline_users, n_eval), replace=False))


def _header(args, ds: Dataset, source: str, device: torch.device, n_eval: int, dim: int, vectors: str,
            notes: list[str]) -> dict:
    return {
        "benchmark": "eval", "command": args.command,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k != "command"},
        "data": {"source": source, "users": ds.n_users, "items": ds.n_items, "eval_users_per_split": n_eval,
                 "ranked_users": n_eval * len(SPLITS), "max_len": ds.max_len, "dim": dim, "vectors": vectors,
                 "splits": list(SPLITS), "protocols": list(PROTOCOLS), "ks": list(DEFAULT_KS)},
        "notes": notes,
    }


def _count_mismatches(project_ranks_: dict[str, dict[str, list[int]]],
                      project_ties: dict[str, dict[str, list[int]]], base_pos: dict) -> tuple[int, int]:
    """(users whose baseline top-k position lies outside the evaluator's tie interval [h, h + t] (clipped
    to ``TOPK``), users whose target ties with another item)."""
    mismatches = tied = 0
    for split in SPLITS:
        for p in PROTOCOLS:
            for h, t, r_base in zip(project_ranks_[split][p], project_ties[split][p], base_pos[split][p],
                                    strict=True):
                tied += t > 0
                if not min(h, TOPK) <= r_base <= min(h + t, TOPK):
                    mismatches += 1
    return mismatches, tied


def _run(args, ds: Dataset, source: str, device: torch.device, log) -> dict:
    notes = []
    if args.graph_emb:
        user, item, note = graph_vectors(args.graph_emb, ds)
        vectors = f"graph embedding {args.graph_emb}"
        if note:
            notes.append(note)
    else:
        user, item = random_vectors(ds, args.dim, args.seed)
        vectors = (f"random (seed {args.seed}): items N(0, 1/d); users = mean of training items + "
                   f"{PLANT} × held-out items + noise")
    if args.dtype != "fp32":
        user, item = user.to(VECTOR_DTYPES[args.dtype]), item.to(VECTOR_DTYPES[args.dtype])
        vectors += f", rounded to {args.dtype} (both paths score them in fp32)"
    dim = int(item.shape[1])
    n_eval, sub = _prepare(args, ds, notes)
    header = _header(args, ds, source, device, n_eval, dim, vectors, notes)
    log(f"# eval benchmark on {header['device']} (torch {header['torch']}, {header['threads']} threads): "
        f"{ds.n_users} users × {ds.n_items} items, {n_eval} evaluated users per split, d={dim}; "
        f"splits {'+'.join(SPLITS)}, protocols {'+'.join(PROTOCOLS)}")
    user_d, item_d = user.to(device), item.to(device)

    # -- correctness guard on the subset (also the project's warm-up) --
    sub_ds = subset_dataset(ds, sub)
    sub_user = user_d[torch.from_numpy(sub).to(device)]
    proj_sub, proj_sub_s = run_project(sub_ds, sub_user, item_d, args.batch_size, device, args.ties)

    # -- baseline: timed on the subset, extrapolated --
    _reset_peak(device)
    base_sub: dict = {}
    base_pos: dict = {}
    sync(device)
    t0 = time.perf_counter()
    for split in SPLITS:
        base_sub[split], base_pos[split] = baseline_eval(ds, split, user_d, item_d, sub, device)
    sync(device)
    base_s = time.perf_counter() - t0
    base_peak, peak_kind = _peak(device)

    diff = compare(proj_sub, base_sub)
    ranks_ties = {split: project_ranks(ds, split, user, item, sub, device) for split in SPLITS}
    mismatches, tied = _count_mismatches({s: r for s, (r, _) in ranks_ties.items()},
                                         {s: t for s, (_, t) in ranks_ties.items()}, base_pos)
    tolerance = TOLERANCE if args.tolerance is None else args.tolerance

    # -- project: every user --
    _reset_peak(device)
    proj_all, proj_s = run_project(ds, user_d, item_d, args.batch_size, device, args.ties)
    proj_peak, _ = _peak(device)

    return _report(args, header, notes, device, log, ds, dim, n_eval, sub, proj_all, proj_s, proj_peak, peak_kind,
                   base_s, base_peak, proj_sub, proj_sub_s, base_sub, diff, tolerance, mismatches,
                   project_note="hellm_ds.eval.evaluate", baseline_note="per-user loop",
                   extra_params={"dtype": args.dtype}, extra_guard={}, tied=tied)


def _main_model(args, device: torch.device, log) -> dict:
    """Model mode: load the run's dataset (its max_len) and export, then benchmark (``_run_model``)."""
    from hellm_ds.errors import DataFormatError, UsageError
    from hellm_ds.exports import load_checkpoint_model, load_run_dataset

    if args.graph_emb:
        raise SystemExit("bench_eval.py: error: --checkpoint and --graph-emb are exclusive")
    if args.dtype != "fp32":
        raise SystemExit("bench_eval.py: error: --dtype applies to the vectors of data mode; a checkpoint is "
                         "evaluated in its own dtype")
    if args.data is None:
        raise SystemExit("bench_eval.py: error: --checkpoint needs --data (the run's dataset)")
    try:
        ds, meta = load_run_dataset(args.checkpoint, args.data, args.max_len)
        args.max_len = ds.max_len
        sync(device)
        t0 = time.perf_counter()
        model = load_checkpoint_model(args.checkpoint, ds, device, meta=meta)
        sync(device)
        load_s = time.perf_counter() - t0
    except (UsageError, DataFormatError) as e:
        raise SystemExit(f"bench_eval.py: error: {e}") from None
    return _run_model(args, ds, str(args.data), device, log, model, meta, load_s)


def _run_model(args, ds: Dataset, source: str, device: torch.device, log, model, meta: dict,
               load_s: float) -> dict:
    notes: list[str] = []
    cfg = meta["model"]
    dim = int(model.hidden_size)
    dtype = str(model.dtype).replace("torch.", "")
    n_params = sum(p.numel() for p in model.parameters())
    n_eval, sub = _prepare(args, ds, notes)
    vectors = (f"fine-tuned HeLLM {args.checkpoint} (backbone {cfg.get('model')}, {dtype}, item head "
               f"{cfg.get('item_head')}, prefix {model.cfg.prefix_len if model.cfg.prefix_on else 0}, "
               f"{n_params:,} parameters, epoch {meta.get('epoch')}): user vectors = HeLLM.user_vectors, "
               "items = HeLLM.item_scoring")
    if dtype != "float32":
        notes.append(f"{dtype} model: the batch-1 and batched forwards round differently; the guard's "
                     "tolerance may need raising (--tolerance) and near-ties can change top-k positions")
    header = _header(args, ds, source, device, n_eval, dim, vectors, notes)
    header["model"] = {"checkpoint": str(args.checkpoint), "config": cfg, "dtype": dtype, "parameters": n_params,
                       "epoch": meta.get("epoch"), "load_seconds": load_s}
    log(f"# eval benchmark (model mode) on {header['device']} (torch {header['torch']}, {header['threads']} "
        f"threads): {args.checkpoint} ({cfg.get('model')}, {dtype}, H={dim}, {n_params:,} parameters; loaded in "
        f"{load_s:.1f} s); {ds.n_users} users × {ds.n_items} items, max_len {ds.max_len}, {n_eval} evaluated "
        f"users per split; splits {'+'.join(SPLITS)}, protocols {'+'.join(PROTOCOLS)}")

    # -- correctness guard on the subset (also the project's warm-up), keeping its user vectors --
    sub_ds = subset_dataset(ds, sub)
    capture: dict = {}
    proj_sub, proj_sub_s = run_model_project(sub_ds, model, args.batch_size, device, capture, args.ties)
    proj_ranks, proj_ties, proj_scores = {}, {}, {}
    for split in SPLITS:
        proj_ranks[split], proj_ties[split], proj_scores[split] = captured_ranks(capture, split)
    del capture

    # -- baseline: one forward per user, timed on the subset, extrapolated --
    warm = subset_dataset(ds, sub[:1])
    baseline_model_eval(warm, "valid", model, warm.split("valid").users, device)  # untimed warm-up forward
    _reset_peak(device)
    base_sub: dict = {}
    base_pos: dict = {}
    base_scores: dict = {}
    sync(device)
    t0 = time.perf_counter()
    for split in SPLITS:
        base_sub[split], base_pos[split], base_scores[split] = baseline_model_eval(ds, split, model, sub, device)
    sync(device)
    base_s = time.perf_counter() - t0
    base_peak, peak_kind = _peak(device)

    diff = compare(proj_sub, base_sub)
    mismatches, tied = _count_mismatches(proj_ranks, proj_ties, base_pos)
    score_diff = max(abs(a - b) for split in SPLITS
                     for a, b in zip(proj_scores[split], base_scores[split], strict=True))
    tolerance = MODEL_TOLERANCE if args.tolerance is None else args.tolerance

    # -- project: every user (evaluate_checkpoint's work after loading) --
    _reset_peak(device)
    proj_all, proj_s = run_model_project(ds, model, args.batch_size, device, ties=args.ties)
    proj_peak, _ = _peak(device)

    notes.append("model loading is excluded from both timings (header model.load_seconds)")
    return _report(args, header, notes, device, log, ds, dim, n_eval, sub, proj_all, proj_s, proj_peak, peak_kind,
                   base_s, base_peak, proj_sub, proj_sub_s, base_sub, diff, tolerance, mismatches,
                   project_note=f"evaluate_checkpoint: batched LLM forward ({args.batch_size} users) + chunked "
                                "u·Wᵀ+b ranking",
                   baseline_note="batch-1 LLM forward (full logits) + python masking + topk per user",
                   extra_params={"mode": "model", "dtype": dtype},
                   extra_guard={"max_abs_target_score_diff": score_diff,
                                "tolerance_note": (f"fp32 LLM forward at batch size 1 vs {args.batch_size}: "
                                                   "scores agree to rounding, metrics to the tolerance; "
                                                   "top-k positions must be identical")}, tied=tied)


def _report(args, header: dict, notes: list[str], device: torch.device, log, ds: Dataset, dim: int, n_eval: int,
            sub: np.ndarray, proj_all: dict, proj_s: float, proj_peak: float, peak_kind: str, base_s: float,
            base_peak: float, proj_sub: dict, proj_sub_s: float, base_sub: dict, diff: float, tolerance: float,
            mismatches: int, project_note: str, baseline_note: str, extra_params: dict, extra_guard: dict,
            tied: int = 0) -> dict:
    """Records, summary, JSON, table; fails loudly (after writing) when the guard failed. With tied targets
    the metrics of the two paths legitimately differ (tie orders): only the positions are then required."""
    correct = (diff <= tolerance or tied > 0) and mismatches == 0
    ranked_sub = len(sub) * len(SPLITS)
    ranked_all = n_eval * len(SPLITS)
    base_per_user = base_s / ranked_sub
    base_all = base_per_user * ranked_all
    common = {"splits": list(SPLITS), "protocols": list(PROTOCOLS), "dim": dim, "items": ds.n_items,
              "ties": args.ties, **extra_params}
    records = [
        {"name": "project", "params": {**common, "batch_size": args.batch_size, "users": ranked_all},
         "metrics": {"seconds": proj_s, "seconds_measured": proj_s, "users_measured": ranked_all,
                     "users_per_s": ranked_all / proj_s, "ms_per_user": 1e3 * proj_s / ranked_all,
                     "extrapolated": False, "peak_mem_mb": proj_peak, "peak_mem_kind": peak_kind},
         "status": "ok", "note": f"{project_note}, all {ranked_all} ranked users (both splits)"},
        {"name": "baseline", "params": {**common, "batch_size": 1, "users": ranked_all, "topk": TOPK},
         "metrics": {"seconds": base_all, "seconds_measured": base_s, "users_measured": ranked_sub,
                     "users_per_s": 1.0 / base_per_user, "ms_per_user": 1e3 * base_per_user,
                     "extrapolated": ranked_sub < ranked_all, "peak_mem_mb": base_peak,
                     "peak_mem_kind": peak_kind},
         "status": "ok",
         "note": (f"{baseline_note}, timed on {ranked_sub} ranked users ({len(sub)} per split), "
                  f"EXTRAPOLATED to {ranked_all}" if ranked_sub < ranked_all else
                  f"{baseline_note}, all {ranked_all} ranked users (not extrapolated)")},
    ]
    summary = {
        "speedup": base_all / proj_s,
        "speedup_note": "baseline seconds extrapolated to all users / project seconds measured on all users"
        if ranked_sub < ranked_all else "both measured on all users",
        "correct": correct,
        "ties": args.ties,
        "mean_ties": {s: {p: proj_all[s][p].get("mean_ties") for p in PROTOCOLS} for s in SPLITS},
        "guard": {"users_per_split": len(sub), "max_abs_metric_diff": diff, "tolerance": tolerance,
                  "metric_check": "required" if tied == 0 else
                  f"reported only: {tied} subset targets tie (positions checked against [h, h + t])",
                  "topk_position_mismatches": mismatches, "tied_targets": tied, **extra_guard,
                  "project_subset_seconds": proj_sub_s,
                  "project_subset": proj_sub, "baseline_subset": base_sub},
        "metrics_all_users": proj_all,
    }
    if device.type == "cpu":
        notes.append("CPU peak memory is the process's max RSS so far (cumulative: the project is timed last)")

    from hellm_ds.utils.bench import write_bench_json

    out_path = Path(args.out)
    write_bench_json(out_path, header, records, summary)
    log(table(records))
    log(f"speed-up (project vs baseline{', baseline extrapolated' if ranked_sub < ranked_all else ''}): "
        f"{summary['speedup']:.1f}×")
    extra = "".join(f", {k} {v:.2e}" for k, v in extra_guard.items() if isinstance(v, float))
    log(f"guard on {len(sub)} users per split: max |Δ metric| {diff:.2e} (tolerance {tolerance:g}), top-{TOPK} "
        f"position mismatches {mismatches}{extra}: {'OK' if correct else 'FAILED'}")
    for split in SPLITS:
        for p in PROTOCOLS:
            m = proj_all[split][p]
            log(f"  {split:<5} {p:<8} Recall@10 {m['Recall@10']:.4f}  NDCG@10 {m['NDCG@10']:.4f}  "
                f"mean ties {m.get('mean_ties', 0):.3g} (rule {args.ties})")
    log(f"wrote {out_path}")
    if not correct:
        raise SystemExit(f"bench_eval.py: error: the project's evaluator and the per-user baseline disagree on "
                         f"{len(sub)} users per split (max |Δ metric| {diff:.3g}, {mismatches} top-k position "
                         f"mismatches); results in {out_path}")
    return {**header, "results": records, "summary": summary}


if __name__ == "__main__":
    main()
