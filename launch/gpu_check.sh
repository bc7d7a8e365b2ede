#!/usr/bin/env bash
# The GPU checks a session with a lent H100/H200 runs, as one prepared command (≤ 6 minutes of steps, so a
# 15-minute device budget leaves room for the machine's start and one rerun):
#   1. the Triton kernel and autograd tests on the GPU (compiled kernels, cuSPARSE; bf16 features included);
#   2. launch/bench_kernels.py: 1M×300k×16M and 10M×2M×160M power-law graphs, d 64/128, fp32/bf16,
#      vs cuSPARSE / COO / materialised R Rᵀ (and Toys when its directory was carried);
#   3. launch/bench_finetune.py: the LLaMA-2-7B shape, LoRA, bf16, SDPA, 8 × 128 tokens — HeLLM through a
#      ZeRO-3 engine, vs a plain HF + peft loop; samples/s, tokens/s, MFU, peak memory.
# Results (JSON + logs) go to $OUT (the device tool's output folder) or runs/gpu_check/; each benchmark
# writes its JSON as it goes, so a step cut short by its time limit keeps what it measured.
# Exit status: the number of failed steps (0 = all passed). GPU_CHECK_STEPS="bench_finetune" (a space-separated
# subset of kernel_tests bench_kernels bench_finetune) reruns only those.
#
# Preparation on the development machine (the device image has torch/transformers/peft/triton, not DeepSpeed):
#   ../shared/tools/gpu-wheels.sh                       # → .whl/ (git-ignored)
#   python3 -m pip download -q --no-deps -d .whl pytest pluggy iniconfig   # in case the image lacks pytest
#   mkdir -p .gpu_data && cp -r ../shared/data/toys .gpu_data/  # optional real graph; ignored via .git/info/exclude
# then: device run  command="bash launch/gpu_check.sh"  carry=[".whl", ".gpu_data"]  timeout_s=420
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-runs/gpu_check}"
mkdir -p "$out"
site=/tmp/hellm_site
rm -rf "$site" && mkdir -p "$site"
failed=0
if ls .whl/*.whl > /dev/null 2>&1; then
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
      > "$out/pip.log" 2>&1; then
    echo "!! installing the carried wheels failed (see pip.log); DeepSpeed may be missing" >&2
    tail -n 5 "$out/pip.log" >&2
    failed=$((failed + 1))
  fi
else
  echo "!! no .whl/ carried: bench_finetune runs without DeepSpeed (see the header)" >&2
fi
# the project itself, laid out as setup.py installs it (kernels/hellm_kernels → hellm_kernels, ds_configs/ →
# package data) without needing setuptools on the image; tests/ and launch/ are used from the checkout
cp -r hellm_ds "$site/" && cp -r kernels/hellm_kernels "$site/" && cp -r ds_configs "$site/hellm_ds/ds_configs"
export PYTHONPATH="$site:$PWD"
python3 -c "import torch, triton, hellm_kernels as k; print('torch', torch.__version__, 'triton', triton.__version__, k.__file__)" \
  > "$out/versions.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/versions.txt" 2>&1
cat "$out/versions.txt" >&2
data_args=()
if [[ -f .gpu_data/toys/sequences.txt ]]; then data_args=(--data .gpu_data/toys); fi

wanted=" ${GPU_CHECK_STEPS:-kernel_tests bench_kernels bench_finetune} "
step() {  # name, time limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  if [[ "$wanted" != *" $name "* ]]; then return; fi
  echo "== $name" >&2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc in $((SECONDS - t0)) s" >&2
  tail -n 25 "$out/$name.log" >&2
  if [[ $rc -ne 0 ]]; then failed=$((failed + 1)); fi
}

# the CUDA compile check is a CPU-side tool for GPU-less machines: not needed here
step kernel_tests 90 python3 -m pytest -q tests/kernels -p no:cacheprovider \
  --ignore=tests/kernels/test_cuda_compile.py
step bench_kernels 200 python3 launch/bench_kernels.py --sizes paper "${data_args[@]}" --dims 64,128 \
  --dtypes fp32,bf16 --out "$out/bench_kernels.json"
step bench_finetune 150 python3 launch/bench_finetune.py --model llama-7b-shape --deepspeed-config \
  ds_configs/zero3.json --steps 10 --warmup 3 --out "$out/bench_finetune.json"
ls -l "$out" >&2
exit "$failed"
