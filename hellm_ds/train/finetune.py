r"""Stage-2 fine-tuning of HeLLM (METHOD §5) with DeepSpeed ZeRO-2/3 — the launch manual.

What it does: builds HeLLM around a frozen (ZeRO-3: partitioned from construction on) LLaMA-family backbone,
wraps it in ``deepspeed.initialize`` with a JSON config from ``ds_configs/``, trains the next-item
cross-entropy — per position (``--objective all``: one sample per user, every history position predicts its
next item; the default for a config-built backbone) or per prefix (``last``: METHOD's, one sample per training
prefix, the default for a checkpoint directory) — with AdamW (β 0.9/0.95, weight decay 0.1 on every trainable
tensor of ≥ 2 dims — LoRA, projector, Gram MLPs, prefix tables, head weight — none on biases and RMSNorm
gains), lr 3e-4, linear warm-up for one epoch then half-cosine to 5e-6 (per optimiser step), gradient
accumulation and clipping from the config (or the CLI), validates every epoch with the shared
evaluator sharded across ranks (``--fusion sasrec``: also HeLLM + w · the stage-1 SASRec for each w of
``FUSION_WEIGHTS``, keeping the best w), evaluates test at every new best validation epoch (so the reported
test is the best-validation epoch's), checkpoints, and exports the trained weights.

Single process (no launcher; the process group — a world of one — is created here, gloo on CPU, nccl on
CUDA)::

    python launch/finetune.py --data DIR --graph-emb RUN/graph_embeddings.safetensors \
        --seq-emb RUN/sequential_item_embeddings.safetensors --model tiny --out OUT \
        --deepspeed_config ds_configs/zero3.json [--epochs 20 --lr 3e-4 --max-len 50 ...]

DeepSpeed launcher (one process per GPU; ``--local_rank`` is accepted and ignored, LOCAL_RANK is read)::

    deepspeed --num_gpus 8 launch/finetune.py ... --deepspeed_config ds_configs/zero3.json

  On a machine without GPUs set ``DS_ACCELERATOR=cpu``: ``deepspeed --num_gpus 2 --master_port PORT
  launch/finetune.py ...`` then starts two CPU ranks (gloo). Without ``--num_gpus`` the launcher asks the
  CPU accelerator for its device count (``LOCAL_SIZE`` if set, else the NUMA nodes with cores, usually 1)
  and starts that many ranks. Set ``OMP_NUM_THREADS`` (e.g. cores ÷ ranks): oversubscribed intra-op threads
  made a tiny-model step ~100× slower on a loaded 2-core machine.

torchrun (same code path: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* come from torchrun)::

    torchrun --nproc_per_node 2 launch/finetune.py ... --deepspeed_config ds_configs/zero2.json

SLURM: launch one task per GPU with ``srun`` and export the torchrun variables from SLURM's
(``RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID MASTER_ADDR=<first node>
MASTER_PORT=<port>``), or run ``torchrun --nnodes $SLURM_NNODES --node_rank $SLURM_NODEID --rdzv_endpoint
HOST:PORT`` once per node; ``deepspeed --hostfile`` (pdsh) also works where ssh between nodes is allowed.

Precision: bf16 on GPU as the JSON says; on CPU the JSON's ``bf16``/``fp16`` are overridden to disabled and
the model is fp32. ZeRO-3 construction: a config-built size (``--model tiny|small|llama-7b-shape``) is built
inside ``deepspeed.zero.Init``; a local checkpoint directory is loaded by ``from_pretrained`` with a live
``HfDeepSpeedConfig`` (transformers then partitions while loading); either way no rank holds the whole
backbone. HeLLM's own (small) parameters are created whole and partitioned by the engine.

Outputs in ``--out``:

- ``log.jsonl`` (rank 0), the shared schema of ``hellm_ds.utils.loop``: ``start``/``resume``, ``train``
  (every optimiser step: loss averaged over ranks and accumulation, lr), ``epoch`` (1-based; mean loss,
  validation), ``test`` (at each new best), ``checkpoint``, ``result``.
- ``checkpoints/<tag>/`` DeepSpeed checkpoints of the *trainable* state only
  (``exclude_frozen_parameters=True``; optimiser/master weights, scheduler, counters) every
  ``--save-every`` steps and after every epoch; ``checkpoints/latest`` names the newest complete one and is
  replaced atomically (written to a temporary file, ``os.replace``) only after every rank finished writing
  the tag directory — DeepSpeed's own ``latest`` (``save_latest=True``) is a plain truncate-and-write and is
  not used. The oldest tags beyond ``--keep-checkpoints`` are deleted after the pointer moved.
  ``--resume`` loads ``latest`` and continues with the same data order (the sampler's permutation depends
  only on seed and epoch; the done micro-batches of the epoch are skipped) and the same dropout noise
  (every micro-batch reseeds the RNG from seed/epoch/step/micro-batch/rank), hence the same losses.
  Resuming a finished run returns its results untouched; starting a run without ``--resume`` in a
  directory that holds checkpoints is refused (a fresh run starts a fresh ``log.jsonl``), and so is a
  resume with other settings (each difference named; ``RESUME_FREE`` lists what may change). A
  ``--max-steps`` stop validates what it has (keeping it only while nothing better is kept; early stopping
  ignores a cut epoch), tests and exports it, and writes ``partial_results.json``.
- ``hellm_adapter.safetensors`` + ``hellm_adapter.json``: all trainable weights gathered from the shards
  (best validation epoch) and the model config; for a config-built backbone with the ``lora`` scope the
  (random, frozen) backbone is also written once to ``hellm_base.safetensors`` — it is not reproducible
  otherwise. ``load_adapter(out)`` rebuilds the model in one plain process (no DeepSpeed).
- ``results.json``: best epoch, its validation and test metrics.
- ``partitioning/rank<R>.json`` with ``--report-partitioning``: per parameter the full size, this rank's
  partition (``ds_tensor.numel()``) and the visible size outside forward (``numel()``, 0 when partitioned).

A non-finite loss (on any rank) stops the run with ``TrainingDiverged`` naming the epoch and step, before
that step's backward, optimiser step or any checkpoint.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from hellm_ds.errors import UsageError
from hellm_ds.exports import (  # noqa: F401  (the export format; re-exported for existing callers)
    ADAPTER_CONFIG,
    ADAPTER_NAME,
    BASE_NAME,
    RESULTS_NAME,
    load_adapter,
    read_item_table,
    write_adapter,
)
from hellm_ds.data.batching import ShardedSampler, training_examples
from hellm_ds.data.dataset import load_dataset
from hellm_ds.eval.evaluator import evaluate
from hellm_ds.train.distributed import (gather_named, init_distributed, partition_report,
                                       preimport_for_zero_init)
from hellm_ds.train.optim import OFFLOAD_OPTIMIZER_CHOICES, build_optimizer, offload_optimizer_plan
from hellm_ds.utils.ds_configs import read_ds_config
from hellm_ds.utils.early_stop import EarlyStopper
from hellm_ds.utils.io import write_json_atomic
from hellm_ds.utils.loop import LoopConfig, LoopState, resume_check, run_loop, start_log
from hellm_ds.utils.progress import progress_bar
from hellm_ds.utils.runlog import RunLog

CKPT_DIR = "checkpoints"
LATEST = "latest"


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the message names the epoch and the optimiser step."""


@dataclass
class FinetuneConfig:
    """Everything a run needs; the CLI flags map 1:1 (``--graph-emb`` → ``graph_emb``)."""

    data: str
    graph_emb: str
    seq_emb: str
    out: str
    model: str = "tiny"
    deepspeed_config: str = "ds_configs/zero3.json"
    # optimisation (METHOD §5)
    epochs: int = 20
    lr: float = 3e-4
    min_lr: float = 5e-6
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_epochs: float = 1.0
    offload_optimizer: str = "auto"  # auto: DeepSpeedCPUAdam when the JSON offloads the optimiser (optim.py)
    micro_batch_size: int | None = None  # None = the JSON's train_micro_batch_size_per_gpu
    grad_accum: int | None = None  # None = the JSON's gradient_accumulation_steps
    grad_clip: float | None = None  # None = the JSON's gradient_clipping
    steps_per_epoch: int | None = None  # cap on optimiser steps per epoch (None = the whole shard)
    max_steps: int | None = None  # stop (as if interrupted) after this many optimiser steps in total
    # data / evaluation
    max_len: int = 50
    eval_batch_size: int = 256
    select_metric: str = "paper/NDCG@10"
    ties: str = "expected"  # tie rule of every metric, the selection included (hellm_ds.eval.metrics)
    patience: int = 5
    skip_eval: bool = False
    # checkpoints
    save_every: int = 0  # optimiser steps; 0 = only at epoch ends
    keep_checkpoints: int = 2
    resume: bool = False
    # model (HeLLMConfig fields)
    prefix_len: int = 10
    prefix_mode: str = "hidden"
    lora_r: int = 16
    trainable_scope: str = "auto"  # auto: full for a config-built size, lora for a checkpoint directory
    item_head: str = "auto"  # auto: tied for a config-built size, linear for a checkpoint directory
    # objective and prompt (llm.config.resolve_objective): auto = all + items for a config-built size,
    # last + method (METHOD's) for a checkpoint directory; prefix_queries auto = last under objective all
    objective: str = "auto"
    prompt: str = "auto"
    prefix_queries: str = "auto"
    # rank by HeLLM + w · the stage-1 SASRec, w ∈ FUSION_WEIGHTS picked on validation (auto: sasrec for a
    # config-built size when the SASRec model is at hand, else none); seq_model: it (default: beside seq_emb)
    fusion: str = "auto"
    seq_model: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    # misc
    seed: int = 0
    report_partitioning: bool = False
    progress: bool = True
    extra_ds: dict = field(default_factory=dict)  # merged into the DeepSpeed JSON (top level)

    def __post_init__(self):
        if self.epochs < 1:
            raise UsageError(f"epochs must be ≥ 1, got {self.epochs}")
        if not 0 < self.min_lr <= self.lr:
            raise UsageError(f"need 0 < min_lr ≤ lr, got {self.min_lr}, {self.lr}")
        if self.warmup_epochs < 0:
            raise UsageError(f"warmup_epochs must be ≥ 0, got {self.warmup_epochs}")
        for name in ("micro_batch_size", "grad_accum", "steps_per_epoch", "max_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UsageError(f"{name} must be ≥ 1, got {v}")
        if "/" not in self.select_metric:
            raise UsageError(
                f"select_metric is PROTOCOL/METRIC (e.g. paper/NDCG@10), got {self.select_metric!r}")
        from hellm_ds.eval.metrics import TIE_RULES

        if self.ties not in TIE_RULES:
            raise UsageError(f"ties must be one of {TIE_RULES}, got {self.ties!r}")
        from hellm_ds.llm.backbone import check_model
        from hellm_ds.llm.config import is_config_built, resolve_objective, resolve_scope_and_head

        # before anything is built: a checkpoint directory's layout, then the one scope/head rule; the
        # resolved values (never "auto") are what the run log, the checkpoints and the export record
        self.model = check_model(self.model)
        self.trainable_scope, self.item_head = resolve_scope_and_head(
            self.model, self.trainable_scope, self.item_head, warn=os.environ.get("RANK", "0") == "0")
        self.objective, self.prompt, self.prefix_queries = resolve_objective(
            self.model, self.objective, self.prompt, self.prefix_queries, self.prefix_mode)
        if self.fusion not in ("auto", *FUSIONS):
            raise UsageError(f"fusion must be 'auto' or one of {FUSIONS}, got {self.fusion!r}")
        if self.fusion == "auto":  # a config-built size whose stage-1 SASRec model is at hand: fuse it
            self.fusion = "sasrec" if is_config_built(self.model) and fusion_model_path(self, False) else "none"

    def hellm_config(self):
        from hellm_ds.llm import HeLLMConfig

        return HeLLMConfig(model=self.model, prefix_len=self.prefix_len, prefix_mode=self.prefix_mode,
                           lora_r=self.lora_r, trainable_scope=self.trainable_scope,
                           item_head=self.item_head, dtype=self.dtype, prompt=self.prompt,
                           prefix_queries=self.prefix_queries, attn_implementation=self.attn_implementation,
                           gradient_checkpointing=self.gradient_checkpointing)

    def to_dict(self) -> dict:
        return asdict(self)


FUSIONS = ("none", "sasrec")
FUSION_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)  # w of HeLLM + w · SASRec, picked on validation (0 = HeLLM)


def fusion_model_path(cfg: FinetuneConfig, required: bool = True) -> Path | None:
    """The SASRec of ``--fusion sasrec``: ``--seq-model``, else ``sasrec_model.safetensors`` beside ``--seq-emb``
    (where pretrain-seq writes both); None when absent and not ``required``."""
    path = Path(cfg.seq_model) if cfg.seq_model else Path(cfg.seq_emb).parent / "sasrec_model.safetensors"
    if not path.is_file():
        if not required:
            return None
        raise UsageError(f"--fusion sasrec needs the stage-1 SASRec model: {path} does not exist (pass --seq-model "
                         "with pretrain-seq's sasrec_model.safetensors, or --fusion none)")
    return path


# ---- schedule --------------------------------------------------------------------------------------------
def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up to ``lr`` over ``warmup_steps``,
    then half-cosine from ``lr`` to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


# ---- DeepSpeed configuration ----------------------------------------------------------------------------
def load_ds_config(cfg: FinetuneConfig, device: torch.device) -> dict:
    _, ds = read_ds_config(cfg.deepspeed_config)
    ds.pop("train_batch_size", None)  # derived from micro batch × accumulation × world
    if cfg.micro_batch_size is not None:
        ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    if cfg.grad_accum is not None:
        ds["gradient_accumulation_steps"] = cfg.grad_accum
    if cfg.grad_clip is not None:
        ds["gradient_clipping"] = cfg.grad_clip
    ds.setdefault("train_micro_batch_size_per_gpu", 8)
    ds.setdefault("gradient_accumulation_steps", 1)
    ds["steps_per_print"] = ds.get("steps_per_print", 10**9)
    if device.type == "cpu":  # fp32 on CPU
        ds["bf16"] = {"enabled": False}
        ds["fp16"] = {"enabled": False}
        zero = ds.get("zero_optimization", {})
        for k in ("offload_param", "offload_optimizer"):
            if k in zero:
                zero[k]["pin_memory"] = False
    ds.update(cfg.extra_ds)
    # the optimiser under offload_optimizer, on every device alike: DeepSpeedCPUAdam, or (--offload-optimizer
    # torch) torch AdamW with zero_force_ds_cpu_optimizer false; finetune() builds the kind this decides
    ds, _ = offload_optimizer_plan(ds, cfg.offload_optimizer, warn=os.environ.get("RANK", "0") == "0")
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def model_dtype(cfg: FinetuneConfig, ds: dict, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return cfg.hellm_config().torch_dtype(device)
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32




DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def resolve_model(cfg: FinetuneConfig, ds: dict, device: torch.device):
    """``(HeLLMConfig, dtype)`` of the run: ``dtype="auto"`` resolved from the DeepSpeed JSON."""
    dtype = model_dtype(cfg, ds, device)
    hcfg = cfg.hellm_config()
    if cfg.dtype == "auto":
        hcfg = replace(hcfg, dtype=DTYPE_NAMES[dtype])
    return hcfg, dtype


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on trainable tensors of ≥ 2 dims, none on biases and norm gains (METHOD §5)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not n.endswith("bias") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- checkpoints -----------------------------------------------------------------------------------------
RUN_META = "run.json"  # in each checkpoint tag: recipe, dataset fingerprint, configuration (read before loading)
# may differ between the invocations of one run: paths (the data is checked by fingerprint), budgets and
# bookkeeping; a longer --epochs stretches the cosine schedule from the next step on
RESUME_FREE = {"data", "graph_emb", "seq_emb", "seq_model", "out", "deepspeed_config", "epochs", "max_steps",
               "resume", "progress", "save_every", "keep_checkpoints", "eval_batch_size", "patience", "skip_eval",
               "report_partitioning"}


def _tag_order(name: str) -> tuple[int, bool]:
    """Checkpoint tags in save order: ``step{N}`` (mid-epoch) before ``step{N}-end`` (after the epoch)."""
    step, _, end = name[4:].partition("-")
    return int(step) if step.isdigit() else -1, end == "end"


def _micro_seed(seed: int, epoch: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, step, micro, rank]).generate_state(1)[0])


def read_latest(ckpt_dir: Path) -> str | None:
    p = ckpt_dir / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    return tag if tag and (ckpt_dir / tag).is_dir() else None


# ---- the run ---------------------------------------------------------------------------------------------
class FinetuneTrainer:
    """Stage 2 as a recipe of the shared loop (``hellm_ds.utils.loop``): the loop owns epochs, validation,
    early stopping and the log schema; this class owns set-up, resume, the optimiser step, evaluation,
    checkpoints and the export. Built on every rank (collectives inside), then ``run()``."""

    name = "finetune"

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        self.out, self.ckpt_dir = Path(cfg.out), Path(cfg.out) / CKPT_DIR
        self.ds_cfg = load_ds_config(cfg, self.device)
        self.stage = zero_stage(self.ds_cfg)
        self.hcfg, self.dtype = resolve_model(cfg, self.ds_cfg, self.device)
        self.show = cfg.progress and self.rank == 0
        self.tag = self._resume_tag()
        self._setup_data()
        self._setup_engine()
        # the output directory is created only now, once every input loaded (a failed start leaves nothing)
        self.log = RunLog(self.out, enabled=self.rank == 0, fresh=not cfg.resume)  # + TensorBoard if installed
        self.state = LoopState(stopper=EarlyStopper(cfg.patience))
        self.best: dict = {}  # {"epoch", "test"} of the kept (exported) state
        self.step_in_epoch = 0  # where the next epoch starts (a resumed run continues its epoch)
        self.losses: list[float] = []

    # -- set-up --
    def _resume_tag(self) -> str | None:
        tag = read_latest(self.ckpt_dir)
        if not self.cfg.resume and tag is not None:
            # a second run would interleave its checkpoints, log and export with the first one's
            raise UsageError(f"{self.ckpt_dir} holds a run's checkpoints: pass --resume to continue it, or use a "
                             "new --out")
        if self.cfg.resume and tag is None and (self.ckpt_dir / LATEST).is_file():
            raise UsageError(f"{self.ckpt_dir / LATEST} names {(self.ckpt_dir / LATEST).read_text().strip()!r}, "
                             "which is not there: refusing to start over silently")
        return tag if self.cfg.resume else None

    def _resume_config(self) -> dict:
        """What a resumed invocation must share with the checkpoint (besides RESUME_FREE's fields)."""
        ds = {k: self.ds_cfg.get(k) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                               "gradient_clipping")}
        return {**self.cfg.to_dict(), "model_config": self.hcfg.to_dict(), "deepspeed": ds,
                "zero_stage": self.stage, "world_size": self.world}

    def _setup_data(self) -> None:
        """Dataset, the checked stage-1 tables, sampler and schedule — before the model: a run that cannot take
        one step (or may not resume) fails before any loading."""
        cfg = self.cfg
        self.dataset = load_dataset(cfg.data, max_len=cfg.max_len)
        if self.tag is not None:
            meta = self.ckpt_dir / self.tag / RUN_META
            if not meta.is_file():
                raise UsageError(f"{meta} is missing (a checkpoint of an older hellm_ds): start a new run in a "
                                 "new --out")
            resume_check(self.ckpt_dir / self.tag, json.loads(meta.read_text()), self.name,
                         self.dataset.fingerprint, self._resume_config(), RESUME_FREE)
        # shape, tensor SHA-256, and made from this dataset (not just one of the same size)
        self.graph_items = read_item_table(cfg.graph_emb, self.dataset, self.dataset.n_items)
        self.seq_items = read_item_table(cfg.seq_emb, self.dataset, self.dataset.n_items)
        self.fusion, self.fusion_path, self.valid_weight = None, None, 0.0
        if cfg.fusion == "sasrec":  # the stage-1 SASRec, outside the engine: it is never trained
            from hellm_ds.pretrain.sasrec import sasrec_from_export

            from hellm_ds.llm.model import check_fusion_table

            self.fusion_path = fusion_model_path(cfg)
            self.fusion, _ = sasrec_from_export(self.fusion_path)
            check_fusion_table(self.fusion, self.seq_items)
            self.fusion = self.fusion.to(self.device).requires_grad_(False)
        self.train = training_examples(self.dataset, cfg.objective, cfg.max_len)
        self.sampler = ShardedSampler(len(self.train), self.world, self.rank, seed=cfg.seed, shuffle=True,
                                      drop_last=True)
        self.micro = int(self.ds_cfg["train_micro_batch_size_per_gpu"])
        self.gas = int(self.ds_cfg["gradient_accumulation_steps"])
        steps = len(self.sampler) // self.micro // self.gas
        if cfg.steps_per_epoch is not None and cfg.steps_per_epoch > steps >= 1 and self.rank == 0:
            print(f"hellm-ds: note: {cfg.steps_per_epoch} fine-tuning steps per epoch asked for, the data gives "
                  f"{steps} ({len(self.sampler)} training samples per rank, {self.micro}×{self.gas} per step): "
                  f"using {steps}", file=sys.stderr, flush=True)
        self.steps_per_epoch = min(steps, cfg.steps_per_epoch or steps)
        if self.steps_per_epoch < 1:
            raise UsageError(f"{len(self.sampler)} training samples per rank do not fill one step of "
                             f"{self.micro}×{self.gas} samples")
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        # the learning rate of each optimiser step (0-based): a plain function, no reference to the trainer
        self.lr_at = functools.partial(lr_at, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=self.warmup,
                                       total_steps=self.total_steps)

    def _setup_engine(self) -> None:
        """HeLLM — its backbone partitioned from construction on under ZeRO-3 — in a DeepSpeed engine."""
        import deepspeed

        cfg = self.cfg
        self._hf_ds_config = None  # must stay alive while transformers loads (it is held through a weakref)
        if self.stage == 3:
            # transformers reads the live HfDeepSpeedConfig: from_pretrained loads shard by shard into
            # partitioned parameters, and from_config builds inside deepspeed.zero.Init (with its own
            # ZeRO-3-aware weight initialisation, which a bare zero.Init around from_config breaks)
            from transformers.integrations.deepspeed import HfDeepSpeedConfig

            preimport_for_zero_init()
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_cfg)
        from hellm_ds.llm.model import build_hellm

        model = build_hellm(self.hcfg, self.graph_items, self.seq_items, seed=cfg.seed)
        self.constructed_partitioned = sum(1 for p in model.backbone.parameters() if hasattr(p, "ds_id"))
        if self.stage != 3:
            model = model.to(self.device)
        else:  # the engine moves (and partitions) parameters; buffers are moved here
            for name in ("graph_items", "seq_items", "instruction_ids", "response_ids"):
                setattr(model, name, getattr(model, name).to(self.device))
        _, kind = offload_optimizer_plan(self.ds_cfg, cfg.offload_optimizer, warn=False)
        self.optimizer = build_optimizer(param_groups(model, cfg.weight_decay), kind, cfg.lr,
                                         (cfg.beta1, cfg.beta2), cfg.weight_decay)
        schedule = self.lr_at  # the engine must not hold the trainer (it is released before the process group)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=self.optimizer, config=self.ds_cfg,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s) / cfg.lr))
        self.model = self.engine.module

    # -- the run --
    def run(self) -> dict:
        cfg = self.cfg
        if cfg.report_partitioning:
            self._report_partitioning()
        if self.tag is not None:
            finished = self._resume()
            if finished is not None:
                return finished
        else:
            start_log(self.log, self.name, False, self.state, dataset=self.dataset.fingerprint,
                      config=cfg.to_dict(), model=self.hcfg.to_dict(), **self._facts())
        proto, metric = cfg.select_metric.split("/", 1)
        lc = LoopConfig(epochs=cfg.epochs, eval_every=1, patience=cfg.patience, select_protocol=proto,
                        select_metric=metric, evaluate=not cfg.skip_eval)
        self.engine.train()
        result = run_loop(self, lc, self.state, self.log, progress=self.show,
                          extra_result={"ties": cfg.ties, **self._facts(False)})
        return {**result, "losses": self.losses}

    def _facts(self, schedule: bool = True) -> dict:
        facts = {"world_size": self.world, "zero_stage": self.stage, "optimizer": type(self.optimizer).__name__}
        if schedule:
            facts.update(dtype=str(self.dtype), micro_batch=self.micro, grad_accum=self.gas,
                         steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                         warmup_steps=self.warmup)
        return facts

    def _resume(self) -> dict | None:
        """Load the newest checkpoint; a finished run's ``results.json`` is returned untouched."""
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=self.tag, load_module_strict=False)
        if client is None:
            raise UsageError(f"could not load checkpoint {self.ckpt_dir / self.tag}")
        self.state = LoopState.from_dict(client["loop"], self.cfg.patience)
        self.step_in_epoch, self.best = int(client["step_in_epoch"]), client["best"]
        self.log.log("resume", step=self.state.step, epoch=self.state.epoch, tag=self.tag,
                     step_in_epoch=self.step_in_epoch, **self._facts())
        finished = self.out / RESULTS_NAME
        if (self.state.epoch >= self.cfg.epochs or self.state.stopper.should_stop) and finished.is_file():
            return json.loads(finished.read_text())  # nothing left to train: the results stand
        return None

    def train_epoch(self, epoch: int, state: LoopState) -> dict:
        """The optimiser steps of ``epoch`` (1-based), from where a resume left it; ``--max-steps`` cuts it."""
        cfg = self.cfg
        self.sampler.set_epoch(epoch - 1)  # the data order depends on (seed, epoch) only
        idx = self.sampler.indices()
        start, self.step_in_epoch, first = self.step_in_epoch, 0, len(self.losses)
        bar = progress_bar(range(start, self.steps_per_epoch), desc=f"finetune epoch {epoch}", enabled=self.show)
        for s in bar:
            loss = self._optimizer_step(idx, epoch, s, state.step + 1)
            state.step += 1
            self.losses.append(loss)
            self.log.log("train", step=state.step, epoch=epoch, loss=loss, lr=self.lr_at(state.step - 1),
                         next_lr=self.scheduler.get_last_lr()[0] if hasattr(self.scheduler, "get_last_lr") else None)
            if self.show:
                bar.set_postfix(loss=f"{loss:.4f}")
            last = s + 1 == self.steps_per_epoch
            if cfg.max_steps is not None and state.step >= cfg.max_steps:
                self.step_in_epoch = 0 if last else s + 1
                return {"loss": _mean(self.losses[first:]), "stopped": "max_steps", "partial": not last}
            if cfg.save_every and state.step % cfg.save_every == 0 and not last:
                self._checkpoint(f"step{state.step}", state, s + 1)
        return {"loss": _mean(self.losses[first:])}

    def _optimizer_step(self, idx: np.ndarray, epoch: int, s: int, step: int) -> float:
        """Step ``s`` of the epoch: ``gas`` micro-batches; returns the loss averaged over ranks and micro-batches.
        A non-finite loss on any rank stops every rank before its backward."""
        from hellm_ds.llm.model import next_item_loss  # (transformers is imported by the model already)

        loss_sum = 0.0
        for a in range(self.gas):
            k = (s * self.gas + a) * self.micro
            batch = {key: v.to(self.device) for key, v in self.train.collate(idx[k: k + self.micro]).items()}
            torch.manual_seed(_micro_seed(self.cfg.seed, epoch - 1, s, a, self.rank))  # dropout noise
            loss = next_item_loss(self.engine(batch), batch)
            total = loss.detach().float().clone()
            dist.all_reduce(total)  # sum over ranks; NaN/inf on any rank makes it non-finite everywhere
            if not torch.isfinite(total).item():
                self.log.log("diverged", step=step, epoch=epoch, micro_batch=a)
                raise TrainingDiverged(f"non-finite loss ({loss.item()}) at epoch {epoch}, optimiser step {step} "
                                       f"(micro-batch {a}); no checkpoint written for it")
            loss_sum += total.item() / self.world / self.gas
            self.engine.backward(loss)
            self.engine.step()
        return loss_sum

    def validate(self) -> dict:
        return self._evaluate("valid")

    def _evaluate(self, split: str) -> dict:
        import deepspeed

        self.engine.eval()
        with deepspeed.zero.GatheredParameters(self.model.item_scoring_params(), modifier_rank=None):
            W, b = self.model.item_scoring()
        run = functools.partial(evaluate, self.dataset, split, item_bias=b, batch_size=self.cfg.eval_batch_size,
                                device=self.device, lockstep=True, ties=self.cfg.ties)
        user_fn = lambda batch: self.model.user_vectors(batch).float()  # noqa: E731
        if self.fusion is None:
            res = run(user_fn, item_vectors=W, progress=self.show)
        else:
            res = self._evaluate_fused(split, run, user_fn, W)
        self.engine.train()
        return res

    def _evaluate_fused(self, split: str, run, user_fn, W: torch.Tensor) -> dict:
        """Rankings of HeLLM + w · SASRec for every w of FUSION_WEIGHTS (validation: the best by the selection
        metric becomes ``valid_weight``; test: ``valid_weight``'s). One forward pass: each batch's HeLLM and
        SASRec user vectors are kept (on the host) and replayed, in the evaluator's own order, per weight."""
        from hellm_ds.llm.model import sasrec_user_vectors

        W = torch.cat([W, self.seq_items.to(W.device).float()], dim=1)  # [h ‖ w·u_s] · [W ‖ s]
        kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

        def first(batch):
            h, u = user_fn(batch), sasrec_user_vectors(self.fusion, batch)
            kept.append((batch["users"].cpu(), h.cpu(), u.cpu()))
            return torch.cat([h, 0.0 * u], dim=1)

        weights = FUSION_WEIGHTS if split == "valid" else (self.valid_weight,)
        results = {0.0: run(first, item_vectors=W, progress=self.show)}
        for w in weights:
            if w in results:
                continue
            replay = iter(kept)

            def fused(batch, w=w):
                users, h, u = next(replay)
                if not torch.equal(users, batch["users"].cpu()):
                    raise RuntimeError("the evaluator visited users in another order than in its first pass")
                return torch.cat([h, w * u], dim=1).to(self.device)

            results[w] = run(fused, item_vectors=W, progress=False)
        if split != "valid":
            return results[self.valid_weight]
        proto, metric = self.cfg.select_metric.split("/", 1)
        scores = {w: results[w][proto][metric] for w in weights}
        self.valid_weight = max(weights, key=lambda w: (scores[w], -w))  # ties: the smaller weight
        self.log.log("fusion", split=split, weights={str(w): s for w, s in scores.items()},
                     chosen=self.valid_weight)
        return results[self.valid_weight]

    def keep_best(self, epoch: int, valid: dict | None, state: LoopState) -> None:
        """A new best: test it (the reported test is the best-validation epoch's) and export its weights."""
        test = None
        if valid is not None:
            test = self._evaluate("test")
            self.log.log("test", step=state.step, epoch=epoch, metrics=test)
        self.best = {"epoch": epoch, "test": test, "fusion_weight": self.valid_weight}
        self._export_weights(epoch)

    def final_test(self, state: LoopState) -> dict | None:
        return self.best.get("test")

    def save(self, state: LoopState) -> None:
        """After an epoch (``step{N}-end``) or a cut (``step{N}``: the resume continues the epoch)."""
        cut = self.step_in_epoch > 0
        self._checkpoint(f"step{state.step}" + ("" if cut else "-end"), state, self.step_in_epoch)

    def _checkpoint(self, tag: str, state: LoopState, step_in_epoch: int) -> None:
        if tag == read_latest(self.ckpt_dir):
            raise RuntimeError(f"checkpoint tag {tag} is the one `latest` names; refusing to overwrite it")
        client = {"loop": state.state_dict(), "step_in_epoch": step_in_epoch, "best": self.best}
        if self.rank == 0 and (self.ckpt_dir / tag).exists():
            shutil.rmtree(self.ckpt_dir / tag)
        dist.barrier()
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False,
                                    exclude_frozen_parameters=True)
        dist.barrier()  # every rank's files are written: only now move the pointer
        if self.rank == 0:
            write_json_atomic(self.ckpt_dir / tag / RUN_META, {"recipe": self.name, "dataset":
                              self.dataset.fingerprint, "config": self._resume_config()})
            write_json_atomic(self.ckpt_dir / LATEST, tag)
            tags = sorted((d for d in self.ckpt_dir.iterdir() if d.is_dir() and d.name.startswith("step")),
                          key=lambda d: _tag_order(d.name))
            for d in tags[: max(0, len(tags) - self.cfg.keep_checkpoints)]:
                if d.name != tag:
                    shutil.rmtree(d, ignore_errors=True)
        dist.barrier()
        self.log.log("checkpoint", step=state.step, tag=tag)

    def _export_weights(self, epoch: int) -> None:
        """``hellm_adapter.*`` (+ the config-built backbone once, for the ``lora`` scope), gathered from the
        shards on every rank, written by rank 0."""
        from hellm_ds.llm.config import MODEL_SIZES

        built_lora = self.hcfg.model in MODEL_SIZES and self.hcfg.trainable_scope == "lora"
        state = gather_named([(n, p) for n, p in self.model.named_parameters() if p.requires_grad])
        base = None
        if built_lora and not (self.out / BASE_NAME).exists():
            base = gather_named([(n, p) for n, p in self.model.named_parameters() if not p.requires_grad])
        if self.rank == 0:
            meta = {"model": self.hcfg.to_dict(), "n_items": self.dataset.n_items,
                    "graph_emb": str(Path(self.cfg.graph_emb).resolve()),
                    "seq_emb": str(Path(self.cfg.seq_emb).resolve()), "seed": self.cfg.seed,
                    "max_len": self.cfg.max_len, "epoch": epoch, "base": BASE_NAME if built_lora else None}
            if self.fusion is not None:
                meta["fusion"] = {"sasrec_model": str(Path(self.fusion_path).resolve()), "weight": self.valid_weight}
            write_adapter(self.out, state, meta, self.dataset.fingerprint, base=base)  # tensors, then JSON
        dist.barrier()

    def export(self, result: dict) -> dict:
        """``results.json`` (``partial_results.json`` after a ``--max-steps`` stop); the weights were exported at
        the best epoch (with ``fusion_weight``, the SASRec weight picked on validation, under ``--fusion sasrec``)."""
        extra = {"fusion_weight": self.best.get("fusion_weight")} if self.fusion is not None else {}
        if self.rank == 0:
            name = ("partial_" if result["stop_reason"] == "max_steps" else "") + RESULTS_NAME
            write_json_atomic(self.out / name, {**result, **extra})
        return extra

    def _report_partitioning(self) -> None:
        rep = partition_report(self.model, self.rank, self.world)
        rep.update(zero_stage=self.stage, constructed_partitioned=self.constructed_partitioned,
                   backbone_params=sum(1 for _ in self.model.backbone.parameters()))
        write_json_atomic(self.out / "partitioning" / f"rank{self.rank}.json", rep)

    def close(self) -> None:
        """Release the engine now, while the process group still exists (not at interpreter exit)."""
        self.log.close()
        self.engine = self.model = self.optimizer = self.scheduler = self._hf_ds_config = None


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def finetune(cfg: FinetuneConfig) -> dict:
    """Train (or resume) one run; returns the results dict (same on every rank) with this invocation's
    per-step ``losses``. The caller's RNG state is untouched: every draw is seeded from (seed, epoch, step,
    micro-batch, rank)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    devices = [local % torch.cuda.device_count()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        trainer = FinetuneTrainer(cfg)
        try:
            return trainer.run()
        finally:
            trainer.close()


# ---- CLI -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from hellm_ds.eval.metrics import DEFAULT_KS, METRICS, TIE_RULES
    from hellm_ds.eval.ranking import PROTOCOLS
    from hellm_ds.llm.config import (ATTN_IMPLEMENTATIONS, DTYPES, ITEM_HEADS, OBJECTIVES, PREFIX_MODES,
                                     PREFIX_QUERIES, PROMPTS, TRAINABLE_SCOPES)
    from hellm_ds.utils.cli_args import ArgumentParser

    p = ArgumentParser(prog="finetune", description="HeLLM stage-2 fine-tuning with DeepSpeed "
                       "(see hellm_ds.train.finetune's docstring for launchers)")
    defaults = {f.name: f.default for f in fields(FinetuneConfig) if f.name != "extra_ds"}
    for name, text in (("data", "dataset directory (sequences.txt, …)"),
                       ("graph_emb", "stage-1 graph embeddings (pretrain-graph's graph_embeddings.safetensors)"),
                       ("seq_emb", "stage-1 item embeddings "
                                   "(pretrain-seq's sequential_item_embeddings.safetensors)"),
                       ("out", f"run directory (log.jsonl, {CKPT_DIR}/, {ADAPTER_NAME}, {RESULTS_NAME})")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, required=True, help=text)
    p.add_argument("--model", default=defaults["model"], help="tiny|small|llama-7b-shape or a local HF dir")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default=defaults["deepspeed_config"],
                   help="DeepSpeed JSON config: a path, or ds_configs/NAME.json of the installed package")
    auto = "auto: full+tied for a config-built backbone, lora+linear for a checkpoint directory"
    metrics = [f"{proto}/{m}@{k}" for proto in PROTOCOLS for m in METRICS for k in DEFAULT_KS]
    # name → (type, help[, choices]); a None default is the config's "not set" and the help says what it means
    options = {
        "epochs": (int, "training epochs"),
        "lr": (float, "peak learning rate (after the warm-up)"),
        "min_lr": (float, "learning rate at the end of the half-cosine decay"),
        "weight_decay": (float, "AdamW weight decay (tensors of ≥ 2 dims)"),
        "beta1": (float, "AdamW β1"),
        "beta2": (float, "AdamW β2"),
        "warmup_epochs": (float, "linear warm-up length in epochs"),
        "offload_optimizer": (str, "optimiser when the JSON offloads it (zero3_offload.json): auto/cpu_adam: "
                                   "DeepSpeedCPUAdam (C++, built once); torch: torch AdamW (slow fall-back)",
                              OFFLOAD_OPTIMIZER_CHOICES),
        "micro_batch_size": (int, "examples per rank and micro-step (default: the JSON's "
                                  "train_micro_batch_size_per_gpu)"),
        "grad_accum": (int, "micro-steps per optimiser step (default: the JSON's gradient_accumulation_steps)"),
        "grad_clip": (float, "gradient-norm clipping (default: the JSON's gradient_clipping)"),
        "steps_per_epoch": (int, "cap on optimiser steps per epoch (default: the whole shard)"),
        "max_steps": (int, "stop, as if interrupted, after this many optimiser steps in total (default: no cap)"),
        "max_len": (int, "keep each user's last N items"),
        "eval_batch_size": (int, "users per evaluation batch"),
        "select_metric": (str, "validation metric that picks the best epoch and drives early stopping "
                               "(e.g. filtered/Recall@20)", metrics),
        "ties": (str, "how metrics count items scored exactly like the target: expected (mean over random tie "
                      "orders) or optimistic (in the target's favour, as the published numbers)", TIE_RULES),
        "patience": (int, "validation epochs without a new best before stopping"),
        "save_every": (int, "optimiser steps between checkpoints (0: only at epoch ends)"),
        "keep_checkpoints": (int, "newest checkpoints kept"),
        "prefix_len": (int, "prefix length L_p (keys/values per layer)"),
        "prefix_mode": (str, "hidden: through each layer's own k/v projections (METHOD); kv: learned in key/value "
                             "space; off: no prefix (ablation)", PREFIX_MODES),
        "lora_r": (int, "LoRA rank (0: no LoRA)"),
        "trainable_scope": (str, f"lora: the backbone is frozen, LoRA and HeLLM's parts train; full: the "
                                 f"backbone trains too; {auto}", ("auto", *TRAINABLE_SCOPES)),
        "item_head": (str, f"linear: a trained Linear(hidden → items); tied: scores from the items' own soft "
                           f"tokens; {auto}", ("auto", *ITEM_HEADS)),
        "objective": (str, "all: every history position predicts its next item (one forward per user); "
                           "last: one prefix → its next item per sample (METHOD); auto: all for a config-built "
                           "backbone, last for a checkpoint directory", ("auto", *OBJECTIVES)),
        "prompt": (str, "items: BOS + the soft item tokens; method: METHOD's instruction around them; auto: "
                        "items for a config-built backbone, method for a checkpoint directory", ("auto", *PROMPTS)),
        "prefix_queries": (str, "positions that attend to the prefix: last (after the last item; needed by "
                                "objective all) or all (METHOD); auto: last under objective all",
                           ("auto", *PREFIX_QUERIES)),
        "fusion": (str, "sasrec: rank by HeLLM's scores + w · the stage-1 SASRec's, w picked on validation from "
                        f"{', '.join(map(str, FUSION_WEIGHTS))} (0: HeLLM alone); none: HeLLM alone; auto: sasrec "
                        "for a config-built backbone when the SASRec model is at hand (--seq-model, or beside "
                        "--seq-emb), else none", ("auto", *FUSIONS)),
        "seq_model": (str, "the SASRec model of --fusion sasrec (default: sasrec_model.safetensors beside "
                           "--seq-emb)"),
        "dtype": (str, "dtype of every parameter (auto: bfloat16 on CUDA, float32 on CPU)",
                  ("auto", *sorted(DTYPES))),
        "attn_implementation": (str, "transformers attention kernel", ATTN_IMPLEMENTATIONS),
        "seed": (int, "random seed"),
    }
    for name, (typ, text, *choices) in options.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=defaults[name], help=text,
                       choices=choices[0] if choices else None,
                       metavar="PROTOCOL/METRIC@K" if name == "select_metric" else None)
    for name, text in (("resume", f"continue from OUT/{CKPT_DIR}/{LATEST}"),
                       ("report_partitioning", "write OUT/partitioning/rank<R>.json (ZeRO partition sizes)"),
                       ("gradient_checkpointing", "activation checkpointing of the decoder layers"),
                       ("skip_eval", "no validation or test at epoch ends")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", help=text)
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--verbose", action="store_true", help="show DeepSpeed's INFO logs and library warnings")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(argv=None) -> FinetuneConfig:
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank", None)
    args.pop("verbose", None)  # what is shown, not what is trained: main() applies it
    return FinetuneConfig(**args)


def main(argv=None) -> int:
    from hellm_ds.errors import DataFormatError
    from hellm_ds.utils.io import removed_if_left_empty
    from hellm_ds.utils.verbosity import configure_deepspeed_output

    try:
        cfg = config_from_args(argv)  # checks --model's layout and resolves the scope/head rule
    except UsageError as e:
        print(f"error: {e}", flush=True)
        return 2
    # before DeepSpeed runs: its INFO logs and its collectives' FutureWarnings only with --verbose
    configure_deepspeed_output(verbose=build_parser().parse_args(argv).verbose)
    try:
        # rank 0 (the one that creates it) removes an --out a failed start left empty
        with removed_if_left_empty(cfg.out if os.environ.get("RANK", "0") == "0" else None):
            res = finetune(cfg)
    except (UsageError, DataFormatError, TrainingDiverged) as e:
        print(f"error: {e}", flush=True)
        return 3 if isinstance(e, TrainingDiverged) else 2
    if dist.is_initialized() and dist.get_rank() == 0 or not dist.is_initialized():
        print(json.dumps({k: v for k, v in res.items() if k != "losses"}, default=str), flush=True)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0
