# Shared logic of the sbatch scripts in launch/slurm/ (sourced, never run): environment set-up, the CPU
# fallback, the rendezvous address, the resolved-config echo, and running a command so that the batch shell
# can requeue the job when Slurm warns it (`#SBATCH --signal=B:USR1@SECONDS`).
#
# The sourcing script has set ROOT (the checkout), VENV and LOG_DIR before sourcing.

# ---- environment --------------------------------------------------------------------------------------
hellm_setup() {
  mkdir -p "$LOG_DIR"
  cd "$ROOT"
  if [[ -n "${VENV:-}" && -f "$VENV/bin/activate" ]]; then
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
  fi
  # intra-op threads per rank: the CPUs Slurm gave the task (torch would take every core of the node)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
  if [[ "$(hellm_visible_gpus)" -eq 0 ]]; then
    export DS_ACCELERATOR=cpu  # DeepSpeed's CPU accelerator: gloo ranks, fp32 (the trainer disables bf16)
  fi
}

# Number of GPUs this process can use: 0 when CUDA_VISIBLE_DEVICES hides them all or nvidia-smi lists none.
hellm_visible_gpus() {
  local cvd="${CUDA_VISIBLE_DEVICES-unset}" n
  case "$cvd" in
    "" | "-1" | NoDevFiles) echo 0; return ;;
  esac
  if ! command -v nvidia-smi > /dev/null 2>&1; then echo 0; return; fi
  n="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"
  if [[ "$cvd" != unset && "${n:-0}" -gt 0 ]]; then
    n="$(tr ',' '\n' <<< "$cvd" | grep -c . || true)"
  fi
  echo "${n:-0}"
}

# Ranks per node: the GPUs Slurm allocated on a node (SLURM_GPUS_ON_NODE, or --gpus-per-node's count), else
# the tasks per node (a CPU-only allocation runs that many CPU ranks).
hellm_default_ranks_per_node() {
  local g="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
  g="${g##*:}"  # --gpus-per-node=a100:8 → 8
  if [[ -z "$g" || "$g" == 0 ]]; then
    g="${SLURM_NTASKS_PER_NODE:-1}"
    g="${g%%(*}"  # 8(x2) → 8
  fi
  echo "$g"
}

# ---- rendezvous ---------------------------------------------------------------------------------------
# MASTER_ADDR: the first host of the allocation; MASTER_PORT: kept when set, else derived from the job id
# (20000-31999, below the ephemeral range; jobs sharing a node differ unless their ids differ by a multiple
# of 12000; a requeued job keeps its id and so its port).
hellm_master() {
  local hosts
  hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
  export MASTER_ADDR="${MASTER_ADDR:-${hosts%%$'\n'*}}"
  export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12000))}"
}

# ---- logging ------------------------------------------------------------------------------------------
# hellm_print_config NAME... : the Slurm context and the named variables, resolved, one per line.
hellm_print_config() {
  local v
  echo "== ${SLURM_JOB_NAME:-job} ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname)" \
    "at $(date -Is)"
  echo "   nodes=${SLURM_JOB_NODELIST:-?} nnodes=${SLURM_NNODES:-?} ntasks=${SLURM_NTASKS:-?}" \
    "cpus_per_task=${SLURM_CPUS_PER_TASK:-?} visible_gpus=$(hellm_visible_gpus)"
  for v in "$@"; do
    echo "   $v=${!v-}"
  done
  echo "   DS_ACCELERATOR=${DS_ACCELERATOR:-} OMP_NUM_THREADS=${OMP_NUM_THREADS:-}" \
    "python=$(command -v python || true)"
}

# ---- requeue on Slurm's warning -----------------------------------------------------------------------
# hellm_run CMD... runs CMD in the background and waits for it; a USR1 to the batch shell (sent by
# `#SBATCH --signal=B:USR1@SECONDS` before the time limit) requeues the job with `scontrol requeue` — the
# requeued job resumes from the newest checkpoint — but only if one of the files in the array HELLM_WATCH
# changed since the job started (a job that never checkpoints would otherwise restart from the same point
# forever). Returns CMD's exit status.
HELLM_WATCH=()
_hellm_mark() {
  local f
  for f in "${HELLM_WATCH[@]}"; do
    stat -c '%n %i %Y %s' "$f" 2> /dev/null || echo "$f absent"
  done
}

# (no `return` in here: bash 5.2 applies a trap handler's `return` to the function waiting in hellm_run)
_hellm_on_usr1() {
  if [[ "$(_hellm_mark)" == "$_HELLM_MARK0" ]]; then
    echo "== USR1: no new checkpoint since the job started; not requeueing" >&2
  else
    echo "== USR1: requeueing job ${SLURM_JOB_ID} (it resumes from the newest checkpoint)" >&2
    scontrol requeue "$SLURM_JOB_ID" || echo "== scontrol requeue failed (is the job --requeue?)" >&2
  fi
}

hellm_run() {
  local pid rc
  _HELLM_MARK0="${_HELLM_MARK0-$(_hellm_mark)}"  # the first call's: progress counts from the job's start
  trap _hellm_on_usr1 USR1
  "$@" &
  pid=$!
  while true; do
    rc=0
    wait "$pid" || rc=$?
    # wait returns early (status > 128) when a trapped signal arrives: keep waiting while CMD runs
    if kill -0 "$pid" 2> /dev/null; then continue; fi
    break
  done
  trap - USR1
  return "$rc"
}
