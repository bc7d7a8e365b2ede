"""The distributed set-up of stage 2, apart from the training loop: the process group (from the launcher's
RANK/WORLD_SIZE/LOCAL_RANK, or a world of one), DeepSpeed's CPU backend without its JIT-built shm op, full
copies of ZeRO-3-partitioned parameters, and a per-rank partitioning report."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist



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
            # a world of one: the OS picks the store's port when it binds it (a port chosen beforehand can be
            # taken by another process in between: EADDRINUSE)
            os.environ.setdefault("MASTER_PORT", "0")
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


def preimport_for_zero_init() -> None:
    """``deepspeed.zero.Init`` patches tensor construction; modules that transformers imports lazily during
    model construction (torch._dynamo through masking_utils) fail to import under that patch, so import them
    first."""
    import torch._dynamo  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    import transformers.masking_utils  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.__name__  # noqa: B018  (resolve the lazy attribute)
