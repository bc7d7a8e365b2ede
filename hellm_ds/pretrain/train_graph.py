"""Graph pre-training recipe (stage 1): MMHCL on a dataset directory → ``graph_embeddings.safetensors``.

    hellm-ds pretrain-graph --data DIR --out DIR [--preset toys] [--epochs N] [--time-budget SECONDS]

Loop (the shared one, ``hellm_ds.utils.loop``: epochs from 1, time budget across resumes, validation every
``eval_every`` epochs, early stopping, best-state keeping, checkpoint/resume, one log schema): each epoch is
one pass over the training (user, item) pairs in shuffled batches (a positive each, one uniformly drawn
negative the user never trained on); Adam; full-ranking validation (scores u · iᵀ, both protocols); the
best-on-validation weights are kept, tested, and exported. ``checkpoint_last.pt`` is written after every
epoch (atomically), and ``resume=True`` continues from it on exactly the same trajectory (sampling comes
from a seeded generator whose state is checkpointed). Deterministic by seed on CPU.

Export: ``user`` [U+1, d] (row 0 padding; row u+1 = the dataset's internal user u, i.e. file order),
``item`` [I+1, d] (row = item id), ``user_ids`` [U] (external ids), metadata: dataset fingerprint,
hyper-parameters, best epoch and metrics.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from hellm_ds.data.dataset import Dataset, load_dataset
from hellm_ds.errors import UsageError
from hellm_ds.eval.evaluator import evaluate_splits
from hellm_ds.eval.metrics import TIE_RULES
from hellm_ds.graph.build import GraphConfig, Graphs, load_or_build
from hellm_kernels import kernel_choices
from hellm_kernels.spmm import BACKENDS
from hellm_ds.pretrain.mmhcl import MMHCL, MMHCLConfig
from hellm_ds.pretrain.presets import GRAPH_PRESETS
from hellm_ds.utils.device import resolve_device
from hellm_ds.utils.checkpoint import check_export_owner, export_tensors
from hellm_ds.utils.early_stop import EarlyStopper
from hellm_ds.utils.loop import (FileCheckpoint, LoopConfig, LoopState, refuse_used_directory, run_loop,
                                 start_log)
from hellm_ds.utils.progress import progress_bar
from hellm_ds.utils.runlog import RunLog

EXPORT_NAME = "graph_embeddings.safetensors"
CHECKPOINT_NAME = "checkpoint_last.pt"


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


class _GraphRecipe:
    """The graph recipe's part of the shared loop (``hellm_ds.utils.loop``)."""

    name = "graph"

    def __init__(self, model: MMHCL, dataset: Dataset, cfg: GraphTrainConfig, device, progress: bool,
                 ckpt: FileCheckpoint):
        self.model, self.dataset, self.cfg, self.device, self.progress, self.ckpt = \
            model, dataset, cfg, device, progress, ckpt
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        users, items = dataset.train_interactions()
        self.sampler = NegativeSampler(users, items - 1, dataset.n_items)
        self.pairs_u, self.pairs_i = torch.from_numpy(users), torch.from_numpy(items - 1)
        self.gen = torch.Generator().manual_seed(cfg.seed)  # its state is checkpointed: resume is exact
        self.best_state: dict | None = None

    def load_state_dict(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optim"])
        self.gen.set_state(st["generator"])
        self.best_state = st["best_state"]

    def train_epoch(self, epoch: int, state: LoopState) -> dict:
        self.model.train()
        n_pairs, bs = self.pairs_u.numel(), self.cfg.batch_size
        steps = (n_pairs + bs - 1) // bs
        perm = torch.randperm(n_pairs, generator=self.gen)
        sums: dict[str, float] = {}
        bar = progress_bar(range(steps), desc=f"graph epoch {epoch}", enabled=self.progress)
        for s in bar:
            idx = perm[s * bs: (s + 1) * bs]
            u, p = self.pairs_u[idx], self.pairs_i[idx]
            n = self.sampler(u, self.gen)
            terms = self.model.loss(u.to(self.device), p.to(self.device), n.to(self.device))
            if not torch.isfinite(terms["loss"]):
                raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {s}: {terms['loss'].item()}")
            self.opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            self.opt.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{sums['loss'] / (s + 1):.4f}")
        state.step += steps
        return {k: v / steps for k, v in sums.items()}

    def validate(self) -> dict:
        return _evaluate(self.model, self.dataset, ("valid",), self.cfg, self.device, self.progress)["valid"]

    def keep_best(self, epoch: int, valid: dict, state: LoopState) -> None:
        self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def save(self, state: LoopState) -> None:
        self.ckpt.save(state, {"model": self.model.state_dict(), "optim": self.opt.state_dict(),
                               "generator": self.gen.get_state(), "best_state": self.best_state})

    def final_test(self, state: LoopState) -> dict:
        self.model.load_state_dict(self.best_state)
        return _evaluate(self.model, self.dataset, ("test",), self.cfg, self.device, self.progress)["test"]

    def export(self, result: dict) -> dict:
        """The embeddings; the result gains ``kernels``: which sparse kernel ran for each operator and why
        (``hellm_kernels.kernel_choices``: on CUDA, ``auto`` probed and timed the candidates)."""
        extra = {"kernels": kernel_choices()}
        user, item = self.model.embeddings()
        pad = lambda t: torch.cat([t.new_zeros(1, t.shape[1]), t]).float().cpu()  # noqa: E731
        export_tensors(self.ckpt.path.parent / EXPORT_NAME,
                       {"user": pad(user), "item": pad(item),
                        "user_ids": torch.from_numpy(self.dataset.user_ids.copy())},
                       {"stage": "graph", "config": _cfg_dict(self.cfg), "result": {**result, **extra},
                        "max_len": self.dataset.max_len}, self.dataset.fingerprint)
        return extra


def train_graph(dataset: Dataset, cfg: GraphTrainConfig, out_dir: str | Path, resume: bool = False,
                progress: bool = True, graphs: Graphs | None = None, cache_dir: str | Path | None = None) -> dict:
    """Train (or resume), select on validation, test the selected weights, export; see the module docstring.
    Returns the loop's result (``hellm_ds.utils.loop``)."""
    out = Path(out_dir)
    check_export_owner(out / EXPORT_NAME, dataset.fingerprint)
    ckpt = FileCheckpoint(out / CHECKPOINT_NAME, "graph", dataset.fingerprint, _cfg_dict(cfg), _RESUME_FREE)
    refuse_used_directory(ckpt.path, resume)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    if graphs is None:
        graphs = load_or_build(dataset, GraphConfig(knn_k=cfg.knn_k), cache_dir or out / "graph_cache")
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)  # initialisation depends on the seed only
        model = MMHCL(graphs, cfg.model, backend=cfg.backend).to(device)
    recipe = _GraphRecipe(model, dataset, cfg, device, progress, ckpt)
    state = LoopState(stopper=EarlyStopper(cfg.patience))
    if resume:
        state, recipe_state = ckpt.load(cfg.patience)
        recipe.load_state_dict(recipe_state)
    log = RunLog(out, fresh=not resume)
    start_log(log, "graph", resume, state, config=_cfg_dict(cfg), dataset=dataset.fingerprint,
              train_pairs=int(recipe.pairs_u.numel()), n_items=dataset.n_items)
    lc = LoopConfig(epochs=cfg.epochs, eval_every=cfg.eval_every, patience=cfg.patience,
                    time_budget=cfg.time_budget, select_protocol=cfg.select_protocol,
                    select_metric=cfg.select_metric)
    result = run_loop(recipe, lc, state, log, progress, extra_result={"ties": cfg.ties})
    log.close()
    return result


def _cfg_dict(cfg: GraphTrainConfig) -> dict:
    return asdict(cfg)


# may differ between a checkpoint and the run resuming it: they do not change the trajectory
_RESUME_FREE = {"epochs", "time_budget", "patience", "eval_every", "device", "backend", "eval_batch_size"}


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
