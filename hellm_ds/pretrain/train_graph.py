"""Graph pre-training recipe (stage 1): MMHCL on a dataset directory → ``graph_embeddings.safetensors``.

    hellm-ds pretrain-graph --data DIR --out DIR [--preset toys] [--epochs N] [--time-budget SECONDS]

Loop: each epoch is one pass over the training (user, item) pairs in shuffled batches (a positive each,
one uniformly drawn negative the user never trained on); Adam; every ``eval_every`` epochs full-ranking
validation (scores u · iᵀ, both protocols); early stopping on the validation metric with ``patience``
evaluations; the best-on-validation weights are kept, tested, and exported. ``checkpoint_last.pt`` is written
after every epoch (atomically), and ``resume=True`` continues from it on exactly the same trajectory
(sampling comes from a seeded generator whose state is checkpointed). Deterministic by seed on CPU.
``time_budget`` counts training time across resumes (as SASRec's): training stops after the epoch that
crosses it (that epoch is validated), and a resumed run that has already early-stopped or spent its budget
trains no further epoch — it re-tests and re-exports the best weights (raise ``epochs``/``time_budget`` to
train on).

Export: ``user`` [U+1, d] (row 0 padding; row u+1 = the dataset's internal user u, i.e. file order),
``item`` [I+1, d] (row = item id), ``user_ids`` [U] (external ids), metadata: dataset fingerprint,
hyper-parameters, best epoch and metrics.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from hellm_ds.data.dataset import Dataset, load_dataset
from hellm_ds.errors import UsageError
from hellm_ds.eval.evaluator import evaluate_splits
from hellm_ds.eval.metrics import TIE_RULES
from hellm_ds.graph.build import GraphConfig, Graphs, load_or_build
from hellm_kernels.spmm import BACKENDS
from hellm_ds.pretrain.mmhcl import MMHCL, MMHCLConfig
from hellm_ds.pretrain.presets import GRAPH_PRESETS
from hellm_ds.utils.device import resolve_device
from hellm_ds.utils.checkpoint import check_export_owner, export_tensors, load_state, save_state
from hellm_ds.utils.early_stop import EarlyStopper
from hellm_ds.utils.progress import progress_bar, progress_line
from hellm_ds.utils.runlog import RunLog

EXPORT_NAME = "graph_embeddings.safetensors"


@dataclass(frozen=True)
class GraphTrainConfig:
    # metadata["help"]: the `hellm-ds pretrain-graph` flag's help text (see add_cli)
    model: MMHCLConfig = field(default_factory=MMHCLConfig)
    knn_k: int = field(default=10, metadata={"help": "kNN hyperedge size per item and modality (self included)"})
    # the authors use 1e-4 (METHOD §3); 1e-3 reaches the same plateau in far fewer epochs
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    batch_size: int = field(default=1024, metadata={"help": "(user, positive, negative) triples per step"})
    epochs: int = field(default=200, metadata={"help": "maximum epochs"})
    eval_every: int = field(default=5, metadata={"help": "validate every N epochs"})
    patience: int = field(default=5, metadata={"help": "evaluations without improvement before stopping"})
    select_metric: str = "NDCG@10"
    select_protocol: str = "paper"
    # best-epoch selection and early stopping use the reported rule (hellm_ds.eval.metrics)
    ties: str = field(default="expected", metadata={
        "help": "tie rule of the metrics: expected (mean over random tie orders) or optimistic",
        "choices": TIE_RULES})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = "auto"
    backend: str = "auto"
    time_budget: float | None = field(default=None, metadata={  # across resumes
        "help": "seconds of training; stops after the epoch that crosses it"})
    eval_batch_size: int = 1024

    def __post_init__(self):
        if self.ties not in TIE_RULES:
            raise UsageError(f"GraphTrainConfig: ties must be one of {TIE_RULES}, got {self.ties!r}")



class NegativeSampler:
    """Uniform negatives that are not among the user's training items (a few vectorised re-draws)."""

    def __init__(self, users: np.ndarray, items0: np.ndarray, n_items: int):
        self.n_items = n_items
        self.known = torch.from_numpy(np.unique(users * n_items + items0))

    def __call__(self, users: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        neg = torch.randint(0, self.n_items, users.shape, generator=gen)
        for _ in range(10):
            key = users * self.n_items + neg
            pos = torch.searchsorted(self.known, key).clamp_max(self.known.numel() - 1)
            clash = self.known[pos] == key
            if not clash.any():
                break
            neg[clash] = torch.randint(0, self.n_items, (int(clash.sum()),), generator=gen)
        return neg


def train_graph(dataset: Dataset, cfg: GraphTrainConfig, out_dir: str | Path, resume: bool = False,
                progress: bool = True, graphs: Graphs | None = None, cache_dir: str | Path | None = None) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_export_owner(out / EXPORT_NAME, dataset.fingerprint)
    ckpt = out / "checkpoint_last.pt"
    if not resume and ckpt.exists():
        raise UsageError(f"{ckpt} exists: pass resume=True (--resume) to continue that run, or use a new --out")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if graphs is None:
        graphs = load_or_build(dataset, GraphConfig(knn_k=cfg.knn_k), cache_dir or out / "graph_cache")
    model = MMHCL(graphs, cfg.model, backend=cfg.backend).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    users_np, items_np = dataset.train_interactions()
    items0_np = items_np - 1
    sampler = NegativeSampler(users_np, items0_np, dataset.n_items)
    pairs_u, pairs_i = torch.from_numpy(users_np), torch.from_numpy(items0_np)
    gen = torch.Generator().manual_seed(cfg.seed)
    stopper = EarlyStopper(cfg.patience)
    log = RunLog(out, fresh=not resume)
    start_epoch, best_state, best_metrics, elapsed_before = 0, None, None, 0.0

    if resume:
        if not ckpt.is_file():
            raise UsageError(f"--resume: no checkpoint at {ckpt}")
        st = load_state(ckpt)
        if st.get("recipe", "graph") != "graph":
            raise UsageError(f"{ckpt} is a {st['recipe']} checkpoint: give each stage-1 recipe its own --out")
        if st["dataset"] != dataset.fingerprint or _resumable(st["config"]) != _resumable(_cfg_dict(cfg)):
            raise UsageError(f"{ckpt} belongs to another dataset or configuration; refusing to resume from it")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        gen.set_state(st["generator"])
        stopper.load_state_dict(st["stopper"])
        start_epoch, best_state, best_metrics = st["epoch"] + 1, st["best_state"], st["best_metrics"]
        elapsed_before = st["elapsed"]
        log.log("resume", epoch=st["epoch"])

    t0 = time.time()

    def budget_spent() -> bool:
        return cfg.time_budget is not None and elapsed_before + time.time() - t0 >= cfg.time_budget

    epoch_seconds: list[float] = []
    n_pairs = pairs_u.numel()
    steps = (n_pairs + cfg.batch_size - 1) // cfg.batch_size
    epoch = start_epoch - 1
    spent = cfg.time_budget is not None and elapsed_before >= cfg.time_budget  # by the checkpointed epochs
    stop_reason = "early_stop" if stopper.should_stop else "time_budget" if spent else "epochs"
    while stop_reason == "epochs" and epoch + 1 < cfg.epochs:
        epoch += 1
        model.train()
        te = time.time()
        perm = torch.randperm(n_pairs, generator=gen)
        sums: dict[str, float] = {}
        bar = progress_bar(range(steps), desc=f"graph epoch {epoch}", enabled=progress)
        for s in bar:
            idx = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            u, p = pairs_u[idx], pairs_i[idx]
            n = sampler(u, gen)
            terms = model.loss(u.to(device), p.to(device), n.to(device))
            if not torch.isfinite(terms["loss"]):
                raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {s}: {terms['loss'].item()}")
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{sums['loss'] / (s + 1):.4f}")
        rec = {k: v / steps for k, v in sums.items()}
        epoch_seconds.append(time.time() - te)
        rec["seconds"] = round(epoch_seconds[-1], 3)
        budget_hit = budget_spent()
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or budget_hit:
            valid = _evaluate(model, dataset, ("valid",), cfg, device, progress)["valid"]
            rec["valid"] = valid
            if stopper.update(valid[cfg.select_protocol][cfg.select_metric], epoch):
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                best_metrics = valid
        log.log("epoch", step=epoch, **rec)
        if progress:  # one line per epoch (the bar is drawn on a terminal only)
            v = rec["valid"][cfg.select_protocol][cfg.select_metric] if "valid" in rec else None
            sel = "" if v is None else f", valid {cfg.select_protocol} {cfg.select_metric} {v:.4f}"
            progress_line(f"graph epoch {epoch}: loss {rec['loss']:.4f} ({rec['seconds']:.1f} s){sel}")
        save_state(ckpt, {"recipe": "graph", "model": model.state_dict(), "optim": opt.state_dict(),
                          "generator": gen.get_state(), "stopper": stopper.state_dict(), "epoch": epoch,
                          "best_state": best_state, "best_metrics": best_metrics,
                          "elapsed": elapsed_before + time.time() - t0, "dataset": dataset.fingerprint,
                          "config": _cfg_dict(cfg)})
        stop_reason = "early_stop" if stopper.should_stop else "time_budget" if budget_hit else "epochs"

    if best_state is None:  # never evaluated (e.g. a budget shorter than one eval period): use the last weights
        valid = _evaluate(model, dataset, ("valid",), cfg, device, progress)["valid"]
        best_state, best_metrics = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, valid
        stopper.update(valid[cfg.select_protocol][cfg.select_metric], epoch)
    model.load_state_dict(best_state)
    test = _evaluate(model, dataset, ("test",), cfg, device, progress)["test"]
    seconds = elapsed_before + time.time() - t0
    result = {"valid": best_metrics, "test": test, "ties": cfg.ties, "best_epoch": stopper.best_epoch,
              "epochs_run": epoch + 1, "stop_reason": stop_reason, "seconds": round(seconds, 2),
              "train_seconds_per_epoch": round(float(np.mean(epoch_seconds)), 3) if epoch_seconds else None}
    user, item = model.embeddings()
    pad = lambda t: torch.cat([t.new_zeros(1, t.shape[1]), t]).float().cpu()  # noqa: E731
    export_tensors(out / EXPORT_NAME, {"user": pad(user), "item": pad(item),
                                       "user_ids": torch.from_numpy(dataset.user_ids.copy())},
                   {"stage": "graph", "config": _cfg_dict(cfg), "result": result, "max_len": dataset.max_len},
                   dataset.fingerprint)
    log.log("final", **result)
    log.close()
    return result


def _cfg_dict(cfg: GraphTrainConfig) -> dict:
    return asdict(cfg)


def _resumable(cfg: dict) -> dict:
    """The part of a configuration a resumed run must share (more epochs or time are fine)."""
    return {k: v for k, v in cfg.items() if k not in ("epochs", "time_budget", "device", "backend")}


def _evaluate(model: MMHCL, dataset: Dataset, splits, cfg: GraphTrainConfig, device, progress) -> dict:
    model.eval()
    user, item = model.embeddings()
    items = torch.cat([item.new_zeros(1, item.shape[1]), item])
    return evaluate_splits(dataset, lambda b: user[b["users"]], splits=splits, item_vectors=items,
                           batch_size=cfg.eval_batch_size, device=device, progress=progress, ties=cfg.ties)


# ---- command line -------------------------------------------------------------------------------------------
def add_cli(sub) -> None:
    from hellm_ds.utils.cli_args import add_ties_arg, device_arg

    p = sub.add_parser("pretrain-graph", help="stage 1: hypergraph pre-training (MMHCL) → graph embeddings")
    p.add_argument("--data", required=True, help="dataset directory (sequences.txt, …)")
    p.add_argument("--out", required=True,
                   help=f"run directory (log.jsonl, checkpoint_last.pt, {EXPORT_NAME}, graph_cache/)")
    p.add_argument("--max-len", type=int, default=50, help="keep each user's last N items")
    p.add_argument("--preset", choices=sorted(GRAPH_PRESETS), default=None,
                   help="the authors' tuned hyper-parameters for a dataset (explicit flags override)")
    # default None = "not given", so a preset's value is not overridden: the help names the real default
    preset_keys = {k for preset in GRAPH_PRESETS.values() for part in preset.values() for k in part}

    def text(f) -> str:
        default = "none" if f.default is None else f.default
        by_preset = ", or the preset's" if f.name in preset_keys else ""
        return f"{f.metadata['help']} (default: {default}{by_preset})"

    for f in fields(MMHCLConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                       choices=f.metadata.get("choices"), help=text(f))
    for name in ("knn_k", "lr", "batch_size", "epochs", "eval_every", "patience", "seed", "time_budget"):
        f = GraphTrainConfig.__dataclass_fields__[name]
        typ = float if name in ("lr", "time_budget") else int
        p.add_argument(f"--{name.replace('_', '-')}", type=typ, default=None, help=text(f))
    p.add_argument("--device", type=device_arg, default="auto",
                   help="auto (cuda if available), cpu, cuda, cuda:N")
    add_ties_arg(p)
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="SpMM kernels (auto: triton on CUDA, torch otherwise)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd)


def config_from_args(args: argparse.Namespace) -> GraphTrainConfig:
    model_kw = dict(GRAPH_PRESETS[args.preset]["model"]) if args.preset else {}
    train_kw = dict(GRAPH_PRESETS[args.preset].get("train", {})) if args.preset else {}
    for f in fields(MMHCLConfig):
        v = getattr(args, f.name)
        if v is not None:
            model_kw[f.name] = v
    for name in ("knn_k", "lr", "batch_size", "epochs", "eval_every", "patience", "seed", "time_budget"):
        v = getattr(args, name)
        if v is not None:
            train_kw[name] = v
    return GraphTrainConfig(model=MMHCLConfig(**model_kw), device=args.device, backend=args.backend,
                            ties=args.ties, **train_kw)


def _cmd(args) -> dict:
    ds = load_dataset(args.data, max_len=args.max_len)
    return train_graph(ds, config_from_args(args), args.out, resume=args.resume, progress=not args.quiet)
