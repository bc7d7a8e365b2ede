#!/usr/bin/env bash
# Results rows for Scientific (results/scientific/*.json → README "Results", via `hellm-ds report`):
# popularity, graph (MMHCL), SASRec and HeLLM from one `hellm-ds pipeline` per seed (fine-tuning: the
# per-position objective on the items prompt, ranked with the stage-1 SASRec's scores added at the weight
# picked on validation: the defaults for `tiny`), plus stage-2 ablations on the same seed's stage-1 tables,
# one lever each — no SASRec fusion, METHOD's objective and prompt (one prefix per sample, instruction text),
# METHOD's prompt alone, no graph-conditioned prefix, METHOD's linear item head.
# Seeds 0 1 2 (SEEDS="0" for one; JOBS=2 runs two side by side; COLLECT=0 skips the collection, for seeds
# spread over several invocations); one CPU thread per process; about 20
# CPU-minutes per seed (6 for the pipeline, 10 for METHOD's objective).
#   bash launch/reproduce/scientific.sh [RUNS_DIR]      (DATA=… for another copy of the dataset)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
. "$root/launch/reproduce/common.sh"  # environment, record_commit, run_seeds
data="${DATA:-$root/../shared/data/scientific}"
runs="${1:-$root/runs/reproduce/scientific}"
pipeline="hellm-ds pipeline --data $data --out $runs/seedSEED/pipeline --seed SEED --model tiny --ranks 1 \
--graph-epochs 60 --graph-eval-every 2 --seq-epochs 100 --ft-epochs 8 --ft-lr 1e-3 --ft-micro-batch 64 --quiet"
# the pipeline's own fine-tuning settings (scope full + tied head for a config-built backbone), one lever changed
finetune="hellm-ds finetune --data $data --graph-emb $runs/seedSEED/pipeline/graph/graph_embeddings.safetensors \
--seq-emb $runs/seedSEED/pipeline/sasrec/sequential_item_embeddings.safetensors --out $runs/seedSEED/NAME \
--model tiny --trainable-scope full --item-head tied --epochs 8 --lr 1e-3 --micro-batch-size 64 --patience 5 \
--max-len 50 --seed SEED --deepspeed_config ds_configs/zero3.json --no-progress"
names="hellm_fusion_off hellm_method hellm_prompt_method hellm_prefix_off hellm_linear_head"
declare -A ablation=([hellm_fusion_off]="--fusion none" [hellm_method]="--objective last --prompt method"
  [hellm_prompt_method]="--prompt method" [hellm_prefix_off]="--prefix-mode off"
  [hellm_linear_head]="--item-head linear")
declare -A label=([hellm_fusion_off]="HeLLM alone, no SASRec fusion"
  [hellm_method]="HeLLM, METHOD's objective and prompt"
  [hellm_prompt_method]="HeLLM, METHOD's prompt" [hellm_prefix_off]="HeLLM, prefix off"
  [hellm_linear_head]="HeLLM, METHOD's linear item head")
record_commit "$runs"
run_seed() {  # the pipeline, then each ablation on its stage-1 tables; a rerun skips what is done
  local seed=$1 cmd
  mkdir -p "$runs/seed$seed"
  ${pipeline//SEED/$seed} > "$runs/seed$seed/pipeline.json"
  for name in $names; do
    [ -f "$runs/seed$seed/$name/results.json" ] && continue
    cmd="${finetune//SEED/$seed}"
    ${cmd//NAME/$name} ${ablation[$name]} > "$runs/seed$seed/$name.json"
  done
}
run_seeds
[ "${COLLECT:-1}" = 1 ] || exit 0  # COLLECT=0: only the runs (seeds spread over invocations; collect once)
cd "$root"
abl=()
for name in $names; do abl+=(--ablation "$name=${label[$name]} (${ablation[$name]})"); done
python launch/reproduce/collect.py --dataset scientific --data "$data" --runs "$runs" \
  --script launch/reproduce/scientific.sh --command "${pipeline//$root\//}" \
  --ablation-command "${finetune//$root\//} + LEVER" "${abl[@]}"
hellm-ds report
