#!/usr/bin/env bash
# Per-task wrapper that `srun` starts on every task of a step (see finetune.sbatch).
#
#   bash launch/slurm/task.sh CMD...              one task per GPU: exports the torchrun variables from
#                                                 Slurm's, then runs CMD (e.g. python launch/finetune.py ...)
#   bash launch/slurm/task.sh --torchrun ARGS...  one task per node: runs torchrun for this node with
#                                                 GPUS_PER_NODE workers (ARGS = script and its arguments)
#
# MASTER_ADDR, MASTER_PORT (and GPUS_PER_NODE, NNODES for --torchrun) come from the batch script through
# srun's environment. hellm_ds.train.distributed.init_distributed reads RANK, WORLD_SIZE, LOCAL_RANK,
# MASTER_ADDR and MASTER_PORT (env:// rendezvous) and binds cuda:LOCAL_RANK, so every task must see all of
# its node's GPUs (no per-task GPU binding).
set -euo pipefail
: "${MASTER_ADDR:?MASTER_ADDR is not set (the batch script exports it)}"
: "${MASTER_PORT:?MASTER_PORT is not set (the batch script exports it)}"

if [[ "${1:-}" == --torchrun ]]; then
  shift
  exec torchrun --nnodes "${NNODES:-$SLURM_NNODES}" --node_rank "$SLURM_NODEID" \
    --nproc_per_node "$GPUS_PER_NODE" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv_id "$SLURM_JOB_ID" "$@"
fi

export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID" WORLD_SIZE="$SLURM_NTASKS"
exec "$@"
