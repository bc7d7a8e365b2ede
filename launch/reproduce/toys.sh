#!/usr/bin/env bash
# Results rows for Toys (results/toys/*.json → README "Results", via `hellm-ds report`): popularity, graph
# (MMHCL, the authors' Toys preset), SASRec and HeLLM from one `hellm-ds pipeline` per seed — the whole
# pipeline in ≤ 45 minutes on the 2-core CPU: graph pre-training and SASRec get 900 s and 720 s of wall time,
# fine-tuning the per-position objective on the items prompt (the defaults for `tiny`) for up to 10 epochs,
# ranked with the stage-1 SASRec's scores added at the weight picked on validation (--fusion sasrec, tiny's
# default) — plus one stage-2 ablation on the same seed's tables: HeLLM alone (--fusion none).
# Seeds 0 1 2 (SEEDS="0" for one; JOBS=2 runs two side by side, one per core; COLLECT=0 skips the
# collection; ABLATIONS_ONLY=1 runs only the ablation, on pipelines already run); one CPU thread per process;
# about 36 minutes per seed, and 8 more for the ablation.
#   bash launch/reproduce/toys.sh [RUNS_DIR]      (DATA=… for another copy of the dataset)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
. "$root/launch/reproduce/common.sh"  # environment, record_commit, run_seeds
data="${DATA:-$root/../shared/data/toys}"
runs="${1:-$root/runs/reproduce/toys}"
pipeline="hellm-ds pipeline --data $data --out $runs/seedSEED/pipeline --seed SEED --model tiny --ranks 1 \
--graph-preset toys --graph-eval-every 2 --graph-time-budget 900 --seq-time-budget 720 --ft-epochs 10 --ft-lr 1e-3 \
--ft-micro-batch 64 --quiet"
# the pipeline's own fine-tuning settings, one lever changed
finetune="hellm-ds finetune --data $data --graph-emb $runs/seedSEED/pipeline/graph/graph_embeddings.safetensors \
--seq-emb $runs/seedSEED/pipeline/sasrec/sequential_item_embeddings.safetensors --out $runs/seedSEED/NAME \
--model tiny --trainable-scope full --item-head tied --epochs 10 --lr 1e-3 --micro-batch-size 64 --patience 5 \
--max-len 50 --seed SEED --deepspeed_config ds_configs/zero3.json --no-progress"
record_commit "$runs"
run_seed() {  # the pipeline, then the ablation on its stage-1 tables; a rerun skips what is done
  local seed=$1 cmd
  mkdir -p "$runs/seed$seed"
  [ "${ABLATIONS_ONLY:-0}" = 1 ] || ${pipeline//SEED/$seed} > "$runs/seed$seed/pipeline.json"
  [ -f "$runs/seed$seed/hellm_fusion_off/results.json" ] && return
  cmd="${finetune//SEED/$seed}"
  (cd "$root" && ${cmd//NAME/hellm_fusion_off} --fusion none > "$runs/seed$seed/hellm_fusion_off.json")
}
run_seeds
[ "${COLLECT:-1}" = 1 ] || exit 0  # COLLECT=0: only the runs (seeds spread over invocations; collect once)
cd "$root"
python launch/reproduce/collect.py --dataset toys --data "$data" --runs "$runs" --script launch/reproduce/toys.sh \
  --command "${pipeline//$root\//}" --ablation-command "${finetune//$root\//} + LEVER" \
  --ablation "hellm_fusion_off=HeLLM alone, no SASRec fusion (--fusion none)"
hellm-ds report
