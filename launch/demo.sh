#!/usr/bin/env bash
# The main job on the embedded default: set up on a fresh machine (first run only), synthesise a dataset with
# planted structure, then run what the pipeline has so far — statistics, the popularity baseline, stage-1
# graph pre-training (MMHCL) and sequential pre-training (SASRec) — and print one comparison table.
# Everything lands in runs/demo/ (or the directory given as $1).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/launch/setup_env.sh"
# One intra-op thread per process: on 2 shared cores, two spinning OpenMP threads are many times slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
out="${1:-$root/runs/demo}"
mkdir -p "$out"
rm -rf "$out/graph" "$out/seq"  # a demo run starts over (the recipes refuse to overwrite a run without --resume)
hellm-ds synth --out "$out/data" --users 2000 --items 500 --seed 0 --overwrite > "$out/synth.json"
hellm-ds stats --data "$out/data" | tee "$out/stats.json"
hellm-ds baseline popularity --data "$out/data" --quiet > "$out/popularity.json"
echo "stage 1: graph pre-training (MMHCL) ..." >&2
hellm-ds pretrain-graph --data "$out/data" --out "$out/graph" --epochs 30 --eval-every 5 --batch-size 512 \
  --time-budget 150 --quiet > "$out/graph.json"
if hellm-ds pretrain-seq --help > /dev/null 2>&1; then
  echo "stage 1b: sequential pre-training (SASRec) ..." >&2
  hellm-ds pretrain-seq --data "$out/data" --out "$out/seq" --epochs 20 --eval-every 2 --time-budget 150 --quiet \
    > "$out/seq.json"
fi
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [("popularity", "popularity.json"), ("graph (MMHCL)", "graph.json"), ("SASRec", "seq.json")]
print(f"\n{'model':<14} {'protocol':<9} {'R@10':>7} {'N@10':>7} {'R@20':>7} {'N@20':>7}   (test split)")
for name, f in rows:
    if not (out / f).is_file():
        continue
    r = json.loads((out / f).read_text())["test"]
    for proto in ("paper", "filtered"):
        m = r[proto]
        print(f"{name:<14} {proto:<9} {m['Recall@10']:7.4f} {m['NDCG@10']:7.4f} {m['Recall@20']:7.4f} {m['NDCG@20']:7.4f}")
PY
echo "results in $out" >&2
