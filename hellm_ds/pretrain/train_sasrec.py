"""SASRec pre-training recipe (stage 1b, METHOD §4) → ``sequential_item_embeddings.safetensors``.

    hellm-ds pretrain-seq --data DIR --out DIR [--epochs N] [--time-budget SECONDS] [--resume] [--quiet]

or, from Python::

    ds = load_dataset(DIR, max_len=50)
    result = train_sasrec(ds, SASRecTrainConfig(time_budget=600), OUT)

Objective: each user's training part t = ``items[:-2]`` (the whole sequence for users with < 3 items) is read
as input ``t[:-1]`` with targets ``t[1:]``; the loss is the mean over every real position of
``−log softmax(h_j · Eᵀ)[t_{j+1}]`` over all items 1..I (padding column excluded). Because SASRec's positions
count real tokens and attention is causal (see ``hellm_ds.pretrain.sasrec``), position j of the sequence
computes exactly what the prefix ``t[:j+1]`` alone would, so this is the every-prefix → next-item objective of
``Dataset.train_samples``, computed in one pass per user.

Loop: Adam; each epoch visits the users with ≥ 2 training items once, in batches of ``batch_size`` users,
shuffled by a generator seeded with (seed, epoch); dropout draws from torch's RNG re-seeded from
(seed, epoch) inside ``torch.random.fork_rng`` (the caller's RNG state is untouched). Every ``eval_every``
epochs, and after the last epoch, full-ranking validation (both protocols, the shared evaluator); early
stopping after ``patience`` evaluations without a new best of ``select_protocol``/``select_metric``. The
best-on-validation weights are kept; test metrics are those of these weights — the epoch is never chosen on
test. ``time_budget`` (seconds of training and validation, counted across resumes as the graph recipe's)
ends training after the epoch that crosses it (that epoch is validated); the best weights are still tested
and exported. A resumed run that has already early-stopped or spent its budget trains no further epoch.

Checkpoint: ``checkpoint_last.pt`` (atomic) after every epoch: model, optimiser, epoch, early-stopping
state, best weights and metrics, dataset fingerprint, configuration. Since the per-epoch randomness depends
only on (seed, epoch), ``resume=True`` continues with exactly the loss trajectory of an uninterrupted run
(bit-identical on CPU with the same thread count). Hyper-parameters that change the trajectory must match
the checkpoint's; ``epochs``, ``time_budget``, ``patience``, ``eval_every``, ``device`` and threads may
change.

Outputs in ``out_dir``: ``log.jsonl`` (one "epoch" record per epoch: loss, seconds, valid metrics when
evaluated; a final "result" record), ``checkpoint_last.pt``, ``sequential_item_embeddings.safetensors``
(tensor ``item`` [n_items+1, d], row 0 = padding = zeros; metadata: hyper-parameters, best epoch, metrics,
dataset fingerprint) and ``sasrec_model.safetensors`` (every weight of the best model; ``load_sasrec``
rebuilds it, so the reported evaluation can be reproduced). Either export refuses to overwrite a file made
from another dataset, and the check runs before training starts.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hellm_ds.data.batching import left_pad
from hellm_ds.data.dataset import Dataset, load_dataset
from hellm_ds.errors import UsageError
from hellm_ds.eval.evaluator import evaluate
from hellm_ds.eval.metrics import DEFAULT_KS, METRICS, TIE_RULES
from hellm_ds.eval.ranking import PROTOCOLS
from hellm_ds.pretrain.sasrec import SASRec, full_softmax_ce, sasrec_from_export
from hellm_ds.utils.device import resolve_device
from hellm_ds.utils.checkpoint import check_export_owner, export_tensors
from hellm_ds.utils.early_stop import EarlyStopper
from hellm_ds.utils.loop import (FileCheckpoint, LoopConfig, LoopState, refuse_used_directory, run_loop,
                                 start_log)
from hellm_ds.utils.progress import progress_bar
from hellm_ds.utils.runlog import RunLog

EXPORT_NAME = "sequential_item_embeddings.safetensors"
MODEL_NAME = "sasrec_model.safetensors"
CHECKPOINT_NAME = "checkpoint_last.pt"


@dataclass(frozen=True)
class SASRecTrainConfig:
    """Hyper-parameters. The defaults are chosen for a CPU budget: a lighter dropout and a larger learning
    rate than the reference SASRec (0.5, 1e-3) converge in far fewer epochs, which is what matters when an
    epoch costs ~25 s. With them, Toys on one thread of a 2-core AMD EPYC (time_budget 660 s, 21 epochs)
    reaches test Recall@10 0.0795 / NDCG@10 0.0461 (paper protocol; popularity: 0.0089 / 0.0049).

    ``metadata["help"]`` is the help text of the field's `hellm-ds pretrain-seq` flag (see ``_CLI_FIELDS``)."""

    dim: int = field(default=64, metadata={"help": "embedding size"})
    n_blocks: int = field(default=2, metadata={"help": "transformer blocks"})
    n_heads: int = field(default=1, metadata={"help": "attention heads"})
    ffn_dim: int | None = None  # None → dim (the original SASRec's point-wise FFN)
    dropout: float = field(default=0.2, metadata={"help": "dropout probability"})
    max_len: int = field(default=50, metadata={
        "help": "keep each user's last N items (dataset and positional table)"})
    lr: float = field(default=2e-3, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam L2 weight decay"})
    batch_size: int = field(default=128, metadata={"help": "users per step"})
    epochs: int = field(default=200, metadata={"help": "maximum epochs"})
    eval_every: int = field(default=1, metadata={"help": "validate every N epochs"})
    patience: int = field(default=5, metadata={"help": "evaluations without a new best before stopping"})
    select_metric: str = "NDCG@10"
    select_protocol: str = "paper"
    # best-epoch selection and early stopping use the reported rule (hellm_ds.eval.metrics)
    ties: str = field(default="expected", metadata={
        "help": "tie rule of the metrics: expected (mean over random tie orders) or optimistic",
        "choices": TIE_RULES})
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda, cuda:N"})
    time_budget: float | None = field(default=None, metadata={  # counted across resumes
        "help": "seconds; stop after the epoch that crosses it"})
    # torch CPU threads during the call (restored afterwards). When another process keeps one of 2 cores
    # busy, 2 threads are an order of magnitude slower than 1 (OpenMP workers wait on the busy core).
    num_threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads during the run (none: torch's choice)"})
    eval_batch_size: int = 1024

    def __post_init__(self):
        checks = [
            (self.dim >= 1, "dim must be ≥ 1"),
            (self.n_blocks >= 0, "n_blocks must be ≥ 0"),
            (self.n_heads >= 1 and self.dim % self.n_heads == 0, "dim must be a multiple of n_heads ≥ 1"),
            (self.ffn_dim is None or self.ffn_dim >= 1, "ffn_dim must be ≥ 1"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.max_len >= 3, "max_len must be ≥ 3"),
            (self.lr > 0 and math.isfinite(self.lr), "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be ≥ 0"),
            (self.batch_size >= 1, "batch_size must be ≥ 1"),
            (self.epochs >= 0, "epochs must be ≥ 0"),
            (self.eval_every >= 1, "eval_every must be ≥ 1"),
            (self.patience >= 1, "patience must be ≥ 1"),
            (self.select_protocol in PROTOCOLS, f"select_protocol must be one of {PROTOCOLS}"),
            (self.ties in TIE_RULES, f"ties must be one of {TIE_RULES}"),
            (self.select_metric in {f"{m}@{k}" for m in METRICS for k in DEFAULT_KS},
             f"select_metric must be one of {METRICS} @ {DEFAULT_KS}"),
            (self.time_budget is None or self.time_budget > 0, "time_budget must be > 0 seconds"),
            (self.num_threads is None or self.num_threads >= 1, "num_threads must be ≥ 1"),
            (self.eval_batch_size >= 1, "eval_batch_size must be ≥ 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(f"SASRecTrainConfig: {msg} ({self})")


# Fields that may differ between a checkpoint and the run resuming it: they do not change the trajectory.
_RESUME_FREE = {"epochs", "time_budget", "patience", "eval_every", "device", "num_threads", "eval_batch_size"}


def _epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """An independent 63-bit seed per (seed, epoch, stream): stream 0 = shuffling, 1 = dropout."""
    return int(np.random.SeedSequence([seed, epoch, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def build_model(n_items: int, cfg: SASRecTrainConfig) -> SASRec:
    return SASRec(n_items, dim=cfg.dim, n_blocks=cfg.n_blocks, n_heads=cfg.n_heads, max_len=cfg.max_len,
                  dropout=cfg.dropout, ffn_dim=cfg.ffn_dim)


class _TrainSequences:
    """Users with ≥ 2 training items and their training parts ``items[start:end]``."""

    def __init__(self, dataset: Dataset):
        start, end = dataset.offsets[:-1], dataset.train_end
        ok = end - start >= 2
        self.items = dataset.items
        self.start, self.end = start[ok], end[ok]
        self.n_targets = int((self.end - self.start - 1).sum())  # = len(dataset.train_samples)

    def __len__(self) -> int:
        return int(self.start.size)

    def batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) [B, L-1], both left-padded: row b = t[:-1] and t[1:] of its training part t."""
        full = torch.from_numpy(left_pad(self.items, self.start[idx], self.end[idx]))
        return full[:, :-1], full[:, 1:]


def _sequence_loss(model: SASRec, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean CE over the real input positions (targets at padded inputs — a row's first item — are skipped)."""
    h = model(inputs)
    sel = inputs != 0
    # logits over items 1..I only: the padding row is never a valid prediction
    return full_softmax_ce(h[sel], model.item_embeddings()[1:], targets[sel] - 1), int(sel.sum())


def _evaluate(model: SASRec, dataset: Dataset, split: str, cfg: SASRecTrainConfig, device,
              progress: bool) -> dict:
    model.eval()
    with torch.no_grad():
        return evaluate(dataset, split, model.user_vectors, item_vectors=model.item_embeddings(),
                        batch_size=cfg.eval_batch_size, device=device, progress=progress, ties=cfg.ties)


def _cpu_copy(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def train_sasrec(dataset: Dataset, cfg: SASRecTrainConfig, out_dir: str | Path, resume: bool = False,
                 progress: bool = True) -> dict:
    """Train, select on validation, test the selected weights, export; see the module docstring.

    Returns ``{"valid": {protocol: metrics}, "test": {…}, "best_epoch", "epochs_run", "seconds",
    "seconds_per_epoch", "stop_reason", "item_embeddings", "model"}`` — valid/test of the best-on-validation
    epoch (epochs are 1-based; ``epochs_run`` counts epochs before a resume too; ``seconds`` is the wall time
    across resumes (the budget's clock), ``seconds_per_epoch`` the mean training time of this call's epochs,
    evaluation excluded).
    """
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train(dataset, cfg, Path(out_dir), resume, progress)
    finally:
        torch.set_num_threads(threads)


class _SASRecRecipe:
    """The SASRec recipe's part of the shared loop (``hellm_ds.utils.loop``)."""

    name = "sasrec"

    def __init__(self, model: SASRec, data: _TrainSequences, dataset: Dataset, cfg: SASRecTrainConfig, device,
                 progress: bool, ckpt: FileCheckpoint):
        self.model, self.data, self.dataset, self.cfg, self.device, self.progress, self.ckpt = \
            model, data, dataset, cfg, device, progress, ckpt
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.fork_devices = [device.index or 0] if device.type == "cuda" else []
        self.best_state: dict | None = None

    def load_state_dict(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optim"])
        self.best_state = st["best_state"]

    def train_epoch(self, epoch: int, state: LoopState) -> dict:
        cfg, data = self.cfg, self.data
        self.model.train()
        shuffle = torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch, 0))
        perm = torch.randperm(len(data), generator=shuffle).numpy()
        n_batches = math.ceil(len(data) / cfg.batch_size)
        loss_sum, n_sum = 0.0, 0
        with torch.random.fork_rng(devices=self.fork_devices):
            torch.manual_seed(_epoch_seed(cfg.seed, epoch, 1))  # dropout: a function of (seed, epoch)
            bar = progress_bar(range(n_batches), desc=f"sasrec epoch {epoch}", enabled=self.progress)
            for b in bar:
                inputs, targets = data.batch(perm[b * cfg.batch_size: (b + 1) * cfg.batch_size])
                loss, n = _sequence_loss(self.model, inputs.to(self.device), targets.to(self.device))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                loss_sum += float(loss.detach()) * n
                n_sum += n
                if b % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum / n_sum:.4f}")
        if not math.isfinite(loss_sum / n_sum):
            raise FloatingPointError(f"SASRec loss is {loss_sum / n_sum} at epoch {epoch}; lower lr")
        state.step += n_batches
        return {"loss": loss_sum / n_sum}

    def validate(self) -> dict:
        return _evaluate(self.model, self.dataset, "valid", self.cfg, self.device, self.progress)

    def keep_best(self, epoch: int, valid: dict, state: LoopState) -> None:
        self.best_state = _cpu_copy(self.model.state_dict())

    def save(self, state: LoopState) -> None:
        self.ckpt.save(state, {"model": self.model.state_dict(), "optim": self.opt.state_dict(),
                               "best_state": self.best_state})

    def final_test(self, state: LoopState) -> dict:
        self.model.load_state_dict(self.best_state)
        return _evaluate(self.model, self.dataset, "test", self.cfg, self.device, self.progress)

    def export(self, result: dict) -> dict:
        out, cfg = self.ckpt.path.parent, self.cfg
        meta = {"kind": "sasrec", "config": asdict(cfg), "n_items": self.dataset.n_items,
                "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"], "valid": result["valid"],
                "test": result["test"], "input_scale": math.sqrt(cfg.dim)}  # the model feeds √d · E[x]
        table = self.model.item_embeddings().detach().cpu().clone()
        table[0] = 0.0  # padding_idx keeps it zero already; the export guarantees it
        export_tensors(out / EXPORT_NAME, {"item": table}, meta, self.dataset.fingerprint)
        export_tensors(out / MODEL_NAME, _cpu_copy(self.model.state_dict()), meta, self.dataset.fingerprint)
        return {"item_embeddings": str(out / EXPORT_NAME), "model": str(out / MODEL_NAME)}


def _train(dataset: Dataset, cfg: SASRecTrainConfig, out: Path, resume: bool, progress: bool) -> dict:
    if dataset.max_len > cfg.max_len:
        raise UsageError(f"dataset max_len {dataset.max_len} exceeds the model's max_len {cfg.max_len}")
    for name in (EXPORT_NAME, MODEL_NAME):
        check_export_owner(out / name, dataset.fingerprint)
    cfg_dict = asdict(cfg)
    ckpt = FileCheckpoint(out / CHECKPOINT_NAME, "sasrec", dataset.fingerprint, cfg_dict, _RESUME_FREE)
    refuse_used_directory(ckpt.path, resume)
    device = resolve_device(cfg.device)
    data = _TrainSequences(dataset)
    if len(data) == 0:
        raise UsageError("no user has ≥ 2 training items: nothing to train SASRec on")
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)  # initialisation depends on the seed only
        model = build_model(dataset.n_items, cfg)
    recipe = _SASRecRecipe(model.to(device), data, dataset, cfg, device, progress, ckpt)
    state = LoopState(stopper=EarlyStopper(cfg.patience))
    if resume:
        state, recipe_state = ckpt.load(cfg.patience)
        recipe.load_state_dict(recipe_state)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, fresh=not resume)
    start_log(log, "sasrec", resume, state, config=cfg_dict, dataset=dataset.fingerprint, train_users=len(data),
              train_targets=data.n_targets, n_items=dataset.n_items,
              parameters=sum(p.numel() for p in model.parameters()))
    lc = LoopConfig(epochs=cfg.epochs, eval_every=cfg.eval_every, patience=cfg.patience,
                    time_budget=cfg.time_budget, select_protocol=cfg.select_protocol,
                    select_metric=cfg.select_metric)
    result = run_loop(recipe, lc, state, log, progress, extra_result={"ties": cfg.ties})
    log.close()
    return result


def load_sasrec(path: str | Path, device: str | torch.device = "cpu") -> tuple[SASRec, dict]:
    """The best model rebuilt from ``sasrec_model.safetensors`` (in eval mode), and the export's metadata
    (``sasrec.sasrec_from_export``)."""
    return sasrec_from_export(path, device)


# ---- command line ------------------------------------------------------------------------------------------
_CLI_FIELDS = {  # flag → (config field, type); the help text is the field's metadata["help"]
    "--epochs": ("epochs", int),
    "--time-budget": ("time_budget", float),
    "--dim": ("dim", int),
    "--blocks": ("n_blocks", int),
    "--heads": ("n_heads", int),
    "--dropout": ("dropout", float),
    "--lr": ("lr", float),
    "--weight-decay": ("weight_decay", float),
    "--batch-size": ("batch_size", int),
    "--max-len": ("max_len", int),
    "--patience": ("patience", int),
    "--eval-every": ("eval_every", int),
    "--seed": ("seed", int),
    "--device": ("device", str),
    "--ties": ("ties", str),
    "--threads": ("num_threads", int),
}


def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``pretrain-seq`` on a subparsers object; the handler returns the result dict."""
    from hellm_ds.utils.cli_args import device_arg

    config_fields = SASRecTrainConfig.__dataclass_fields__
    p = subparsers.add_parser("pretrain-seq", help="train SASRec and export its item embeddings (stage 1b)")
    p.add_argument("--data", required=True, help="dataset directory (sequences.txt, …)")
    p.add_argument("--out", required=True,
                   help=f"run directory (log.jsonl, {CHECKPOINT_NAME}, {EXPORT_NAME}, {MODEL_NAME})")
    # default None = "not given" (only given flags override the config): the help names the real default
    for flag, (name, typ) in _CLI_FIELDS.items():
        f = config_fields[name]
        p.add_argument(flag, dest=name, type=device_arg if name == "device" else typ, default=None,
                       choices=f.metadata.get("choices"), help=f"{f.metadata['help']} (default: {str(f.default).replace('None', 'none')})")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{CHECKPOINT_NAME}")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_pretrain_seq)
    return p


def cmd_pretrain_seq(args) -> dict:
    overrides = {name: getattr(args, name) for name, _ in _CLI_FIELDS.values()
                 if getattr(args, name) is not None}
    cfg = SASRecTrainConfig(**overrides)
    dataset = load_dataset(args.data, max_len=cfg.max_len)
    return train_sasrec(dataset, cfg, args.out, resume=args.resume, progress=not args.quiet)
