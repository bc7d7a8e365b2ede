r"""Stage-2 fine-tuning of HeLLM (METHOD §5) with DeepSpeed ZeRO-2/3 — the launch manual.

What it does: builds HeLLM around a frozen (ZeRO-3: partitioned from construction on) LLaMA-family backbone,
wraps it in ``deepspeed.initialize`` with a JSON config from ``ds_configs/``, trains the next-item
cross-entropy with AdamW (β 0.9/0.95, weight decay 0.1 on every trainable tensor of ≥ 2 dims — LoRA,
projector, Gram MLPs, prefix tables, head weight — none on biases and RMSNorm gains), lr 3e-4, linear
warm-up for one epoch then half-cosine to 5e-6 (per optimiser step),
gradient accumulation and clipping from the config (or the CLI), validates every epoch with the shared
evaluator sharded across ranks, evaluates test at every new best validation epoch (so the reported test is
the best-validation epoch's), checkpoints, and exports the trained weights.

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

- ``log.jsonl`` (rank 0): ``start``, ``train`` (every optimiser step: loss averaged over ranks and
  accumulation, lr), ``valid``/``test`` (per epoch), ``checkpoint``, ``done``.
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
  directory that holds checkpoints is refused (a fresh run starts a fresh ``log.jsonl``).
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
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from hellm_ds.errors import UsageError
from hellm_ds.train.optim import OFFLOAD_OPTIMIZER_CHOICES, build_optimizer, offload_optimizer_plan
from hellm_ds.utils.ds_configs import read_ds_config
from hellm_ds.utils.io import write_json_atomic
from hellm_ds.utils.net import free_port

ADAPTER_NAME = "hellm_adapter.safetensors"
ADAPTER_CONFIG = "hellm_adapter.json"
BASE_NAME = "hellm_base.safetensors"
RESULTS_NAME = "results.json"
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
        from hellm_ds.llm.config import resolve_scope_and_head

        # before anything is built: a checkpoint directory's layout, then the one scope/head rule; the
        # resolved values (never "auto") are what the run log, the checkpoints and the export record
        self.model = check_model(self.model)
        self.trainable_scope, self.item_head = resolve_scope_and_head(
            self.model, self.trainable_scope, self.item_head, warn=os.environ.get("RANK", "0") == "0")

    def hellm_config(self):
        from hellm_ds.llm import HeLLMConfig

        return HeLLMConfig(model=self.model, prefix_len=self.prefix_len, prefix_mode=self.prefix_mode,
                           lora_r=self.lora_r, trainable_scope=self.trainable_scope,
                           item_head=self.item_head, dtype=self.dtype,
                           attn_implementation=self.attn_implementation,
                           gradient_checkpointing=self.gradient_checkpointing)

    def to_dict(self) -> dict:
        return asdict(self)


# ---- schedule --------------------------------------------------------------------------------------------
def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up to ``lr`` over ``warmup_steps``,
    then half-cosine from ``lr`` to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


# ---- distributed set-up ----------------------------------------------------------------------------------
CPU_SHM_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_comm_build() -> None:
    """Keep DeepSpeed's CPU communication backend from JIT-compiling its shared-memory all-reduce op.

    The op serves only DeepSpeed's inference all-reduce (AutoTP), never ZeRO training, yet the backend builds
    it when it starts: minutes of C++ on a small machine whose ``~/.cache/torch_extensions`` is cold, and a
    process killed mid-build leaves a lock that every later run waits on forever. Marked unavailable, the op
    is skipped exactly as on a platform where it cannot build (the process group's all-reduce is used)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[CPU_SHM_COMM_OP] = False


def init_distributed() -> tuple[int, int, torch.device]:
    """``(rank, world, device)``; creates the process group (a world of one when RANK/WORLD_SIZE are
    unset)."""
    import deepspeed

    if not (dist.is_available() and dist.is_initialized()):
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        local_size = os.environ.get("LOCAL_WORLD_SIZE") or ("1" if os.environ["WORLD_SIZE"] == "1" else None)
        if not torch.cuda.is_available() and local_size and "LOCAL_SIZE" not in os.environ:
            # DeepSpeed's CPU accelerator counts this node's ranks from LOCAL_SIZE, which only its own
            # launcher sets; without it every ZeRO-3 step starts `numactl --hardware` to count NUMA nodes
            os.environ["LOCAL_SIZE"] = local_size
        if not torch.cuda.is_available():
            skip_cpu_shm_comm_build()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        # a task bound to its own GPU (SLURM --gpus-per-task) sees one device whatever its LOCAL_RANK
        local = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


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


# ---- gathering -------------------------------------------------------------------------------------------
def _gathered(params: list, chunk_numel: int = 50_000_000):
    """Yield lists of params, each list gathered in full (ZeRO-3) while the consumer runs."""
    import deepspeed

    group, size = [], 0
    for p in params:
        n = int(getattr(p, "ds_numel", p.numel()))
        if group and size + n > chunk_numel:
            with deepspeed.zero.GatheredParameters(group, modifier_rank=None):
                yield group
            group, size = [], 0
        group.append(p)
        size += n
    if group:
        with deepspeed.zero.GatheredParameters(group, modifier_rank=None):
            yield group


def gather_named(named: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Full CPU copies of the given (possibly partitioned) parameters, on every rank."""
    out, names = {}, {id(p): n for n, p in named}
    for group in _gathered([p for _, p in named]):
        for p in group:
            out[names[id(p)]] = p.detach().to("cpu", copy=True).contiguous()
    return out


def partition_report(model: torch.nn.Module, rank: int, world: int) -> dict:
    rows, full, local = [], 0, 0
    for n, p in model.named_parameters():
        ds_numel = int(getattr(p, "ds_numel", p.numel()))
        part = int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else int(p.numel())
        rows.append({"name": n, "trainable": bool(p.requires_grad), "numel": ds_numel,
                     "partition_numel": part, "visible_numel": int(p.numel()),
                     "partitioned": hasattr(p, "ds_id")})
        full += ds_numel
        local += part
    return {"rank": rank, "world_size": world, "total_numel": full, "total_partition_numel": local,
            "params": rows}


def _preimport_for_zero_init() -> None:
    """``deepspeed.zero.Init`` patches tensor construction; modules that transformers imports lazily during
    model construction (torch._dynamo through masking_utils) fail to import under that patch, so import them
    first."""
    import torch._dynamo  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    import transformers.masking_utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.__name__  # noqa: B018  (resolve the lazy attribute)


def _build_model(hcfg, graph_items, seq_items, dtype, seed):
    """``build_hellm`` with the RNG reseeded between the backbone and HeLLM's own modules, so the
    initial adapter/projector/prefix/head weights do not depend on how the backbone was built (ZeRO-3's
    partitioned construction consumes random numbers differently)."""
    from hellm_ds.llm import HeLLM
    from hellm_ds.llm.backbone import load_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        decoder, tokenizer = load_backbone(hcfg, dtype)
        torch.manual_seed(seed + 1)
        return HeLLM(hcfg, decoder, tokenizer, graph_items, seq_items, dtype=dtype)


# ---- the run ---------------------------------------------------------------------------------------------
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


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not n.endswith("bias") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def finetune(cfg: FinetuneConfig) -> dict:
    """Train (or resume) one run; returns the results dict (same on every rank)."""
    import deepspeed

    from hellm_ds.data.batching import NextItemExamples, ShardedSampler
    from hellm_ds.data.dataset import load_dataset
    from hellm_ds.eval.evaluator import evaluate
    from hellm_ds.llm.config import MODEL_SIZES
    from hellm_ds.utils.checkpoint import export_tensors, load_tensors
    from hellm_ds.utils.early_stop import EarlyStopper
    from hellm_ds.utils.progress import progress_bar, progress_line
    from hellm_ds.utils.runlog import RunLog

    rank, world, device = init_distributed()
    out = Path(cfg.out)
    ckpt_dir = out / CKPT_DIR
    ds_cfg = load_ds_config(cfg, device)
    stage = zero_stage(ds_cfg)
    dtype = model_dtype(cfg, ds_cfg, device)
    hcfg = cfg.hellm_config()
    if cfg.dtype == "auto":
        hcfg = replace(hcfg, dtype={torch.bfloat16: "bfloat16", torch.float16: "float16",
                                    torch.float32: "float32"}[dtype])
    if not cfg.resume and read_latest(ckpt_dir) is not None:
        # a second run would interleave its checkpoints, log and export with the first one's
        raise UsageError(f"{ckpt_dir} holds a run's checkpoints: pass --resume to continue it, or use a new "
                         "--out")
    show = cfg.progress and rank == 0

    dataset = load_dataset(cfg.data, max_len=cfg.max_len)
    n_items = dataset.n_items
    g_t, _ = load_tensors(cfg.graph_emb, {"item": (n_items + 1, None)})
    s_t, _ = load_tensors(cfg.seq_emb, {"item": (n_items + 1, None)})
    graph_items, seq_items = g_t["item"].float(), s_t["item"].float()

    # -- data / schedule (before the model: a run that cannot take one step fails before any loading) --
    train = NextItemExamples(dataset, "train", cfg.max_len)
    sampler = ShardedSampler(len(train), world, rank, seed=cfg.seed, shuffle=True, drop_last=True)
    micro = int(ds_cfg["train_micro_batch_size_per_gpu"])
    gas = int(ds_cfg["gradient_accumulation_steps"])
    steps_per_epoch = len(sampler) // micro // gas
    if cfg.steps_per_epoch is not None and cfg.steps_per_epoch > steps_per_epoch >= 1 and rank == 0:
        print(f"hellm-ds: note: {cfg.steps_per_epoch} fine-tuning steps per epoch asked for, the data gives "
              f"{steps_per_epoch} ({len(sampler)} training samples per rank, {micro}×{gas} per step): using "
              f"{steps_per_epoch}", file=sys.stderr, flush=True)
    if cfg.steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    if steps_per_epoch < 1:
        raise UsageError(f"{len(sampler)} training samples per rank do not fill one step of "
                         f"{micro}×{gas} samples")
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    # -- model, partitioned from construction on under ZeRO-3 --
    hf_ds_config = None  # must stay alive while transformers loads (it is held through a weakref)
    if stage == 3:
        # transformers reads the live HfDeepSpeedConfig: from_pretrained loads shard by shard into
        # partitioned parameters, and from_config builds inside deepspeed.zero.Init (with its own
        # ZeRO-3-aware weight initialisation, which a bare zero.Init around from_config breaks)
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        _preimport_for_zero_init()
        hf_ds_config = HfDeepSpeedConfig(ds_cfg)
    model = _build_model(hcfg, graph_items, seq_items, dtype, cfg.seed)
    constructed_partitioned = [n for n, p in model.backbone.named_parameters() if hasattr(p, "ds_id")]
    if stage != 3:
        model = model.to(device)
    else:
        model.graph_items = model.graph_items.to(device)
        model.seq_items = model.seq_items.to(device)
        model.instruction_ids = model.instruction_ids.to(device)
        model.response_ids = model.response_ids.to(device)

    def lam(step: int) -> float:
        return lr_at(step, cfg.lr, cfg.min_lr, warmup, total_steps) / cfg.lr

    groups = _param_groups(model, cfg.weight_decay)
    _, opt_kind = offload_optimizer_plan(ds_cfg, cfg.offload_optimizer, warn=False)
    optimizer = build_optimizer(groups, opt_kind, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_cfg,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lam))
    hmodel = engine.module
    # the output directory is created only now, once every input loaded (a failed start leaves nothing)
    log = RunLog(out, enabled=rank == 0, fresh=not cfg.resume)  # + TensorBoard when installed

    if cfg.report_partitioning:
        rep = partition_report(hmodel, rank, world)
        rep.update(zero_stage=stage, constructed_partitioned=len(constructed_partitioned),
                   backbone_params=sum(1 for _ in hmodel.backbone.parameters()))
        write_json_atomic(out / "partitioning" / f"rank{rank}.json", rep)

    # -- state (possibly resumed) --
    epoch0, step_in_epoch, global_step = 0, 0, 0
    stopper = EarlyStopper(cfg.patience)
    best: dict = {}
    if cfg.resume:
        tag = read_latest(ckpt_dir)
        if tag is None and (ckpt_dir / LATEST).is_file():
            raise UsageError(f"{ckpt_dir / LATEST} names {(ckpt_dir / LATEST).read_text().strip()!r}, which is "
                             "not there: refusing to start over silently")
        if tag is not None:
            _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False)
            if client is None:
                raise UsageError(f"could not load checkpoint {ckpt_dir / tag}")
            epoch0, step_in_epoch = int(client["epoch"]), int(client["step_in_epoch"])
            global_step = int(client["global_step"])
            stopper.load_state_dict(client["stopper"])
            best = client.get("best", {})
            log.log("resume", step=global_step, tag=tag, epoch=epoch0, step_in_epoch=step_in_epoch)
            finished = out / RESULTS_NAME
            if (epoch0 >= cfg.epochs or stopper.should_stop) and finished.is_file():
                # nothing left to train: the finished run's results stand (not rewritten with no losses)
                log.close()
                del hf_ds_config
                return json.loads(finished.read_text())
    log.log("start", step=global_step, world_size=world, zero_stage=stage, dtype=str(dtype),
            micro_batch=micro, grad_accum=gas, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
            warmup_steps=warmup, optimizer=type(optimizer).__name__,
            config=cfg.to_dict(), model=hcfg.to_dict())

    fingerprint = dataset.fingerprint
    meta = {"model": hcfg.to_dict(), "n_items": n_items, "graph_emb": str(Path(cfg.graph_emb).resolve()),
            "seq_emb": str(Path(cfg.seq_emb).resolve()), "seed": cfg.seed, "max_len": cfg.max_len}

    def save(tag: str, epoch: int, s_in_epoch: int) -> None:
        if tag == read_latest(ckpt_dir):
            raise RuntimeError(f"checkpoint tag {tag} is the one `latest` names; refusing to overwrite it")
        client = {"epoch": epoch, "step_in_epoch": s_in_epoch, "global_step": global_step,
                  "stopper": stopper.state_dict(), "best": best, "config": cfg.to_dict()}
        if rank == 0 and (ckpt_dir / tag).exists():
            shutil.rmtree(ckpt_dir / tag)
        dist.barrier()
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False,
                               exclude_frozen_parameters=True)
        dist.barrier()  # every rank's files are written: only now move the pointer
        if rank == 0:
            write_json_atomic(ckpt_dir / LATEST, tag)
            tags = sorted((d for d in ckpt_dir.iterdir() if d.is_dir() and d.name.startswith("step")),
                          key=lambda d: _tag_order(d.name))
            for d in tags[: max(0, len(tags) - cfg.keep_checkpoints)]:
                if d.name != tag:
                    shutil.rmtree(d, ignore_errors=True)
        dist.barrier()
        log.log("checkpoint", step=global_step, tag=tag)

    def export(epoch: int) -> None:
        trainable = [(n, p) for n, p in hmodel.named_parameters() if p.requires_grad]
        state = gather_named(trainable)
        base = None
        if hcfg.model in MODEL_SIZES and hcfg.trainable_scope == "lora" and not (out / BASE_NAME).exists():
            base = gather_named([(n, p) for n, p in hmodel.named_parameters() if not p.requires_grad])
        if rank == 0:
            m = {**meta, "epoch": epoch, "base": BASE_NAME if hcfg.model in MODEL_SIZES and
                 hcfg.trainable_scope == "lora" else None}
            if base is not None:
                export_tensors(out / BASE_NAME, base, m, fingerprint, overwrite_other_dataset=True)
            export_tensors(out / ADAPTER_NAME, state, m, fingerprint, overwrite_other_dataset=True)
            write_json_atomic(out / ADAPTER_CONFIG, {**m, "dataset": fingerprint})
        dist.barrier()

    def run_eval(split: str) -> dict:
        engine.eval()
        with deepspeed.zero.GatheredParameters(hmodel.item_scoring_params(), modifier_rank=None):
            W, b = hmodel.item_scoring()
        res = evaluate(dataset, split, lambda batch: hmodel.user_vectors(batch).float(), item_vectors=W,
                       item_bias=b, batch_size=cfg.eval_batch_size, device=device, lockstep=True,
                       progress=show, ties=cfg.ties)
        engine.train()
        return res

    losses: list[float] = []
    stopped = None
    engine.train()
    t0 = time.time()
    for epoch in range(epoch0, cfg.epochs):
        if stopper.should_stop:
            stopped = "early_stop"
            break
        sampler.set_epoch(epoch)
        idx = sampler.indices()
        start = step_in_epoch if epoch == epoch0 else 0
        te, first = time.time(), len(losses)
        bar = progress_bar(range(start, steps_per_epoch), desc=f"finetune epoch {epoch}", enabled=show)
        for s in bar:
            step_loss = torch.zeros((), dtype=torch.float64)
            for a in range(gas):
                k = (s * gas + a) * micro
                batch = {key: v.to(device) for key, v in train.collate(idx[k: k + micro]).items()}
                torch.manual_seed(_micro_seed(cfg.seed, epoch, s, a, rank))
                logits = engine(batch)
                loss = F.cross_entropy(logits, batch["targets"])
                total = loss.detach().float().clone()
                dist.all_reduce(total)  # sum over ranks; NaN/inf on any rank makes it non-finite everywhere
                if not torch.isfinite(total).item():
                    log.log("diverged", step=global_step + 1, epoch=epoch, micro_batch=a)
                    raise TrainingDiverged(
                        f"non-finite loss ({loss.item()}) at epoch {epoch}, optimiser step {global_step + 1} "
                        f"(micro-batch {a}); no checkpoint written for it")
                step_loss += total.item() / world / gas
                engine.backward(loss)
                engine.step()
            global_step += 1
            lr = scheduler.get_last_lr()[0] if hasattr(scheduler, "get_last_lr") else None
            losses.append(float(step_loss))
            log.log("train", step=global_step, epoch=epoch, loss=float(step_loss),
                    lr=lr_at(global_step - 1, cfg.lr, cfg.min_lr, warmup, total_steps), next_lr=lr)
            if show:
                bar.set_postfix(loss=f"{float(step_loss):.4f}")
            if cfg.save_every and global_step % cfg.save_every == 0 and s + 1 < steps_per_epoch:
                save(f"step{global_step}", epoch, s + 1)
            if cfg.max_steps is not None and global_step >= cfg.max_steps:
                stopped = "max_steps"
                break
        if stopped == "max_steps":
            break
        # -- end of epoch: validate, test at a new best, checkpoint --
        rec: dict = {"epoch": epoch}
        if not cfg.skip_eval:
            valid = run_eval("valid")
            proto, metric = cfg.select_metric.split("/", 1)
            value = valid[proto][metric]
            log.log("valid", step=global_step, epoch=epoch, metrics=valid)
            if stopper.update(value if math.isfinite(value) else float("-inf"), epoch):
                test = run_eval("test")
                log.log("test", step=global_step, epoch=epoch, metrics=test)
                best = {"epoch": epoch, "valid": valid, "test": test}
                export(epoch)
            rec["valid"] = valid
        else:
            best = {"epoch": epoch}
            export(epoch)
        if show:  # one line per epoch (the bar is drawn on a terminal only)
            part = losses[first:]
            sel = f", valid {cfg.select_metric} {rec['valid'][proto][metric]:.4f}" if "valid" in rec else ""
            progress_line(f"finetune epoch {epoch}: loss {np.mean(part) if part else float('nan'):.4f} "
                          f"({time.time() - te:.1f} s){sel}")
        # its own tag: a run stopped by --max-steps on an epoch's last step saved step{N} before this
        # epoch's evaluation, and a resume must not overwrite the checkpoint ``latest`` names
        save(f"step{global_step}-end", epoch + 1, 0)
    results = {"best_epoch": best.get("epoch"), "valid": best.get("valid"), "test": best.get("test"),
               "ties": cfg.ties, "global_step": global_step, "stopped": stopped, "losses": losses,
               "seconds": round(time.time() - t0, 2), "world_size": world, "zero_stage": stage,
               "optimizer": type(optimizer).__name__}
    if stopped == "max_steps" and not (cfg.save_every and global_step % cfg.save_every == 0
                                       and s + 1 < steps_per_epoch):
        save(f"step{global_step}", epoch, s + 1)  # not saved by the loop just now
    if rank == 0:
        name = "partial_" + RESULTS_NAME if stopped == "max_steps" else RESULTS_NAME
        # per-step losses live in log.jsonl (across resumes); ``seconds`` is this invocation's wall time
        write_json_atomic(out / name, {k: v for k, v in results.items() if k != "losses"})
    log.log("done", step=global_step, best_epoch=best.get("epoch"), stopped=stopped)
    log.close()
    del hf_ds_config
    return results


# ---- reload without DeepSpeed ----------------------------------------------------------------------------
def load_adapter(out_dir: str | Path, graph_items: torch.Tensor | None = None,
                 seq_items: torch.Tensor | None = None, device: str | torch.device = "cpu"):
    """HeLLM rebuilt in one plain process from ``out_dir``'s export (``hellm_adapter.*``, plus
    ``hellm_base.safetensors`` for a config-built backbone); the item tables default to the paths the run
    used. Returns the model in eval mode."""
    from hellm_ds.llm import HeLLMConfig
    from hellm_ds.utils.checkpoint import load_tensors

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / ADAPTER_CONFIG).read_text())
    cfg = HeLLMConfig.from_dict(meta["model"])
    if cfg.model == ".":  # a merged export (hellm_ds.train.merge): the backbone is this directory
        cfg = replace(cfg, model=str(out_dir))
    if graph_items is None:
        graph_items = load_tensors(meta["graph_emb"])[0]["item"].float()
    if seq_items is None:
        seq_items = load_tensors(meta["seq_emb"])[0]["item"].float()
    model = _build_model(cfg, graph_items, seq_items, cfg.torch_dtype("cpu"), meta.get("seed", 0))
    params = dict(model.named_parameters())
    if meta.get("base"):
        base, _ = load_tensors(out_dir / meta["base"])
        with torch.no_grad():
            for n, t in base.items():
                params[n].copy_(t)
    state, _ = load_tensors(out_dir / ADAPTER_NAME)
    model.load_trainable_state_dict(state)
    return model.to(device).eval()


# ---- CLI -------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from hellm_ds.eval.metrics import DEFAULT_KS, METRICS, TIE_RULES
    from hellm_ds.eval.ranking import PROTOCOLS
    from hellm_ds.llm.config import ATTN_IMPLEMENTATIONS, DTYPES, ITEM_HEADS, PREFIX_MODES, TRAINABLE_SCOPES
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
