# Shared by the reproduce scripts (sourced, after they set $root): the environment they run in, the record of
# the commit the runs ran, and the seed loop. Not a script of its own.
[ -x "$root/.venv/bin/hellm-ds" ] || . "$root/launch/setup_env.sh"
export PATH="$root/.venv/bin:$PATH" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
command -v nvidia-smi > /dev/null || export DS_ACCELERATOR=cpu

record_commit() {  # $1 = runs directory: what the runs ran (collect.py records it); kept from the first start
  mkdir -p "$1"
  [ -f "$1/commit.txt" ] || (cd "$root" && echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- hellm_ds kernels \
    || echo +dirty)") > "$1/commit.txt"
}

run_seeds() {  # run_seed (defined by the caller) for each of SEEDS (default 0 1 2), JOBS at a time (default 1)
  local pids=() seed pid
  for seed in ${SEEDS:-0 1 2}; do
    run_seed "$seed" & pids+=($!)
    if [ "${#pids[@]}" -ge "${JOBS:-1}" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}
