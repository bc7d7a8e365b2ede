#!/usr/bin/env bash
# The main job on the embedded default: set up on a fresh machine (first run only), synthesise a dataset with
# planted structure, then run the whole pipeline on it — popularity, hypergraphs, graph pre-training (MMHCL),
# SASRec, ZeRO-3 fine-tuning of a tiny LLaMA-architecture model on every available rank (2 CPU ranks
# without a GPU), evaluation of the exported model — and print one comparison table. About 1.5 minutes on
# 2 idle CPU cores. Everything lands in runs/demo/ (or the directory given as $1); a second run skips what is done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/launch/setup_env.sh"
# One intra-op thread per process: on 2 shared cores, two spinning OpenMP threads are many times slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="${1:-$root/runs/demo}"
mkdir -p "$out"
hellm-ds synth --out "$out/data" --users 2000 --items 500 --seed 0 --overwrite > "$out/synth.json"
hellm-ds stats --data "$out/data"
hellm-ds pipeline --data "$out/data" --out "$out/pipeline" --model tiny \
  --graph-epochs 30 --graph-eval-every 5 --graph-batch-size 512 --graph-time-budget 60 \
  --seq-epochs 20 --seq-eval-every 2 --seq-time-budget 60 \
  --ft-epochs 12 --ft-lr 3e-3 --ft-micro-batch 64 --quiet > "$out/pipeline.json"
hellm-ds plot --run "$out/pipeline/finetune" > /dev/null
echo "results: $out/pipeline.json; curves: $out/pipeline/finetune/plots/" >&2
