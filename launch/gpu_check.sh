#!/usr/bin/env bash
# Every GPU-only branch of the project checked by one prepared, unattended command: step time limits sum to
# 335 s, so with the wheels' install and the summary it ends within 6 minutes, and a 15-minute device budget
# leaves room for the machine's start and one rerun. Steps, in order
# (time limit in seconds; GPU_CHECK_LIMIT_<step>=S overrides one):
#   kernel_tests   50  the Triton kernel, autograd and auto-probe tests on the GPU (tests/kernels: compiled
#                      kernels vs cuSPARSE; fp32, bf16, int64 indices, hub rows)
#   probe          15  backend "auto" on a tiny graph (Triton compiles inside the limit):
#                      hellm_kernels.kernel_choices() (the probe's candidates, timings and choice) →
#                      probe.json ("probe: not available" when the API is absent)
#   bench_kernels  65  launch/bench_kernels.py: 1M×300k×16M and 10M×2M×160M power-law graphs (and Toys when
#                      carried), d 64, fp32/bf16, project vs cuSPARSE / COO / materialised R Rᵀ
#   zero3_step     60  launch/bench_finetune.py: the LLaMA-2-7B shape, LoRA, bf16, one ZeRO-3 engine with
#                      ds_configs/zero3.json vs a plain HF + peft loop; samples/s, MFU, peak memory
#   zero3_offload  45  the same with ds_configs/zero3_offload.json (parameters and optimiser on the CPU;
#                      --offload-optimizer ${GPU_CHECK_OFFLOAD_OPTIMIZER:-torch}: DeepSpeedCPUAdam's JIT build
#                      takes minutes, so the check uses torch's AdamW unless told `auto`)
#   flash_attn     30  the same ZeRO-3 step with --attn-implementation flash_attention_2 when `import
#                      flash_attn` works; skipped with a note otherwise
#   eval_bf16      20  launch/bench_eval.py on the GPU with bf16 vectors: full ranking vs a per-user loop,
#                      the guard, and the mean tie count per target (ties appear with bf16)
#   pipeline_toys  50  hellm-ds pipeline on .gpu_data/toys with --model small and per-stage budgets (graph and
#                      SASRec time budgets, one short fine-tuning epoch), the whole run bounded by its limit
# and always, last: the summary, $OUT/gpu_check.json (hellm_ds.report.write_gpu_summary: per step status,
# seconds, limit, key figures; hardware, date, versions). Copy it to results/bench/gpu_check.json and run
# `hellm-ds report`: the README's Benchmarks table gets one row per step from it.
# Results (JSON + logs) go to $OUT (the device tool's output folder) or runs/gpu_check/; each benchmark
# writes its JSON as it goes, so a step cut short by its time limit keeps what it measured.
# Exit status: the number of failed or timed-out steps (0 = all passed; a skipped step is not a failure).
# Rerun by step: GPU_CHECK_STEPS="zero3_offload eval_bf16" (a space-separated subset) runs only those; the
# summary keeps the other steps' entries from results/bench/gpu_check.json (GPU_CHECK_PREVIOUS=FILE: another
# earlier summary), each with its own date.
#
# Preparation on the development machine (the device image has torch/transformers/peft/triton, not DeepSpeed):
#   ../shared/tools/gpu-wheels.sh                       # → .whl/ (git-ignored)
#   python3 -m pip download -q --no-deps -d .whl pytest pluggy iniconfig   # in case the image lacks pytest
#   mkdir -p .gpu_data && cp -r ../shared/data/toys .gpu_data/  # real graph + pipeline; ignored via .git/info/exclude
# then: device run  command="bash launch/gpu_check.sh"  carry=[".whl", ".gpu_data"]  timeout_s=420
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-runs/gpu_check}"
mkdir -p "$out/steps"
out="$(cd "$out" && pwd)"
site="$(mktemp -d "${TMPDIR:-/tmp}/hellm_site.XXXXXX")"
trap 'rm -rf "$site"' EXIT
failed=0
if ls .whl/*.whl > /dev/null 2>&1; then
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
      > "$out/pip.log" 2>&1; then
    echo "!! installing the carried wheels failed (see pip.log); DeepSpeed may be missing" >&2
    tail -n 5 "$out/pip.log" >&2
    failed=$((failed + 1))
  fi
else
  echo "!! no .whl/ carried: the ZeRO steps run without DeepSpeed (see the header)" >&2
fi
# the project itself, laid out as setup.py installs it (kernels/hellm_kernels → hellm_kernels, ds_configs/ →
# package data) without needing setuptools on the image; tests/ and launch/ are used from the checkout
cp -r hellm_ds "$site/" && cp -r kernels/hellm_kernels "$site/" && cp -r ds_configs "$site/hellm_ds/ds_configs"
export PYTHONPATH="$site:$PWD"
python3 -c "import torch, triton, hellm_kernels as k; print('torch', torch.__version__, 'triton', triton.__version__, k.__file__)" \
  > "$out/versions.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/versions.txt" 2>&1
cat "$out/versions.txt" >&2
toys=""
if [[ -f .gpu_data/toys/sequences.txt ]]; then toys=.gpu_data/toys; fi
data_args=()
if [[ -n "$toys" ]]; then data_args=(--data "$toys"); fi

all_steps="kernel_tests probe bench_kernels zero3_step zero3_offload flash_attn eval_bf16 pipeline_toys"
wanted=" ${GPU_CHECK_STEPS:-$all_steps} "
step() {  # name, time limit in seconds, command... (a function of this script runs in a child bash)
  local name=$1 limit_var="GPU_CHECK_LIMIT_$1"
  local limit=${!limit_var:-$2}
  shift 2
  if [[ "$wanted" != *" $name "* ]]; then return; fi
  echo "== $name (limit $limit s)" >&2
  rm -f "$out/$name.skip"
  local t0=$SECONDS
  if declare -F "$1" > /dev/null; then
    timeout -k 10 "$limit" bash -c "$1" > "$out/$name.log" 2>&1
  else
    timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  fi
  local rc=$?
  echo "$rc $((SECONDS - t0)) $limit" > "$out/steps/$name.status"
  echo "   exit $rc in $((SECONDS - t0)) s" >&2
  tail -n 25 "$out/$name.log" >&2
  if [[ $rc -ne 0 ]]; then failed=$((failed + 1)); fi
}
skip() {  # name, note: a step that cannot run here says why (exit 0 with a .skip note)
  echo "$2" > "$out/$1.skip"
  echo "skipped: $2"
}
probe() {
  python3 - "$out/probe.json" <<'EOF'
import json, sys
import torch
import hellm_kernels as hk
res = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
if not hasattr(hk, "kernel_choices"):
    res["probe"] = "not available (hellm_kernels has no kernel_choices())"
else:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    rows, cols, nnz = 3000, 2000, 60000
    key = torch.unique(torch.randint(0, rows * cols, (nnz,), generator=g))  # distinct (row, col) pairs
    r, c, nnz = key // cols, key % cols, key.numel()
    try:
        A = hk.CSR.from_coo(r, c, (rows, cols), torch.rand(nnz, generator=g)).to(dev)
        X = torch.randn(cols, 64, generator=g).to(dev)
        Y = hk.sparse_mm(A, X, backend="auto")  # one propagation through the auto path: probes on a GPU
        res["output_finite"] = bool(torch.isfinite(Y).all())
        res["choices"] = hk.kernel_choices()
        res["probe"] = "ok" if res["choices"] else "no decision recorded (CPU: auto needs no probe)"
    except Exception as e:  # recorded, not fatal: the kernel tests cover correctness
        res["probe"] = f"error: {type(e).__name__}: {e}"[:300]
        res["choices"] = hk.kernel_choices()
json.dump(res, open(sys.argv[1], "w"), indent=1, default=str)
print(json.dumps(res, default=str)[:2000])
EOF
}
flash_attn() {
  if ! python3 -c "import flash_attn" > /dev/null 2>&1; then
    skip flash_attn "flash-attn does not import on this image (pip wheel not carried): flash_attention_2 not run"
    return 0
  fi
  python3 launch/bench_finetune.py --model llama-7b-shape --deepspeed-config ds_configs/zero3.json \
    --attn-implementation flash_attention_2 --steps 3 --warmup 1 --methods hellm --out "$out/flash_attn.json"
}
pipeline_toys() {
  if [[ -z "$toys" ]]; then
    skip pipeline_toys ".gpu_data/toys not carried: the pipeline step needs the Toys directory"
    return 0
  fi
  local run="${TMPDIR:-/tmp}/gpu_check_pipeline"  # checkpoints stay out of $OUT (only the result JSON returns)
  rm -rf "$run"
  python3 -m hellm_ds pipeline --data "$toys" --out "$run" --model small --graph-epochs 5 \
    --graph-time-budget 12 --seq-epochs 5 --seq-time-budget 8 --ft-epochs 1 --ft-steps-per-epoch 40 \
    > "$out/pipeline_toys.json"
}
export out toys
export -f skip probe flash_attn pipeline_toys

# the CUDA compile check is a CPU-side tool for GPU-less machines: not needed here
step kernel_tests 50 python3 -m pytest -q tests/kernels -p no:cacheprovider \
  --ignore=tests/kernels/test_cuda_compile.py
step probe 15 probe
step bench_kernels 65 python3 launch/bench_kernels.py --sizes paper "${data_args[@]}" --dims 64 \
  --dtypes fp32,bf16 --repeats 10 --out "$out/bench_kernels.json"
step zero3_step 60 python3 launch/bench_finetune.py --model llama-7b-shape --deepspeed-config \
  ds_configs/zero3.json --steps 5 --warmup 2 --out "$out/zero3_step.json"
step zero3_offload 45 python3 launch/bench_finetune.py --model llama-7b-shape --deepspeed-config \
  ds_configs/zero3_offload.json --offload-optimizer "${GPU_CHECK_OFFLOAD_OPTIMIZER:-torch}" --methods hellm \
  --steps 3 --warmup 1 --out "$out/zero3_offload.json"
step flash_attn 30 flash_attn
step eval_bf16 20 python3 launch/bench_eval.py "${data_args[@]}" --device auto --dtype bf16 --ties expected \
  --baseline-users 200 --out "$out/eval_bf16.json"
step pipeline_toys 50 pipeline_toys

# the summary, always: one JSON the README's benchmark table is generated from
previous="${GPU_CHECK_PREVIOUS:-results/bench/gpu_check.json}"
if ! python3 -c "import sys; from hellm_ds.report import write_gpu_summary; \
write_gpu_summary(sys.argv[1], sys.argv[2].split(), sys.argv[3] if sys.argv[3] else None, sys.argv[4])" \
    "$out" "$wanted" "$([[ -f "$previous" ]] && echo "$previous")" \
    "bash launch/gpu_check.sh${GPU_CHECK_STEPS:+ (GPU_CHECK_STEPS=\"$GPU_CHECK_STEPS\")}" 2> "$out/summary.log"; then
  echo "!! writing the summary failed:" >&2
  cat "$out/summary.log" >&2
  failed=$((failed + 1))
else
  echo "== summary: $out/gpu_check.json" >&2
fi
ls -l "$out" >&2
exit "$failed"
