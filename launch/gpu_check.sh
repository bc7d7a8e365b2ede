#!/usr/bin/env bash
# The GPU checks a session with a lent H100/H200 runs, as one prepared command (~8 minutes):
#   1. the Triton kernel and autograd tests compiled for CUDA (not the interpreter), bf16 included;
#   2. launch/bench_kernels.py: 1M×300k×16M and 10M×2M×160M power-law graphs, d 64/128, fp32/bf16,
#      vs cuSPARSE / COO / materialised R Rᵀ (and Toys when its directory was carried);
#   3. launch/bench_finetune.py: the LLaMA-2-7B shape, LoRA, bf16, SDPA, 8 × 128 tokens — HeLLM through a
#      ZeRO-3 engine and plain, vs a plain HF + peft loop; samples/s, tokens/s, MFU, peak memory.
# Results (JSON + logs) go to $OUT (the device tool's output folder) or runs/gpu_check/.
#
# Preparation on the development machine (the device image has torch/transformers/peft/triton, not DeepSpeed):
#   ../shared/tools/gpu-wheels.sh                       # → .whl/ (git-ignored)
#   python3 -m pip download -q --no-deps -d .whl pytest pluggy iniconfig   # in case the image lacks pytest
#   mkdir -p .gpu_data && cp -r ../shared/data/toys .gpu_data/  # optional real graph; ignored via .git/info/exclude
# then: device run  command="bash launch/gpu_check.sh"  carry=[".whl", ".gpu_data"]  timeout_s=590
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
data_args=()
if [[ -f .gpu_data/toys/sequences.txt ]]; then data_args=(--data .gpu_data/toys); fi

step() {  # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name" >&2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc in $((SECONDS - t0)) s" >&2
  tail -n 25 "$out/$name.log" >&2
}

step kernel_tests 120 python3 -m pytest -q -x tests/kernels -p no:cacheprovider
step bench_kernels 240 python3 launch/bench_kernels.py --sizes paper "${data_args[@]}" --dims 64,128 \
  --dtypes fp32,bf16 --out "$out/bench_kernels.json"
step bench_finetune 180 python3 launch/bench_finetune.py --model llama-7b-shape --deepspeed-config \
  ds_configs/zero3.json --out "$out/bench_finetune.json"
ls -l "$out" >&2
