#!/usr/bin/env bash
# The main job on the embedded default: set up on a fresh machine (first run only), synthesise a dataset
# with planted structure, print its statistics and the popularity baseline. Output goes to runs/demo/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/launch/setup_env.sh"
out="${1:-$root/runs/demo}"
mkdir -p "$out"
hellm-ds synth --out "$out/data" --users 2000 --items 500 --seed 0 --overwrite > "$out/synth.json"
hellm-ds stats --data "$out/data" | tee "$out/stats.json"
hellm-ds baseline popularity --data "$out/data" --quiet > "$out/popularity.json"
python - "$out/popularity.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{'popularity':<12} {'split':<6} {'protocol':<9} {'Recall@10':>9} {'NDCG@10':>8} {'Recall@20':>9} {'NDCG@20':>8}")
for split in ("valid", "test"):
    for proto in ("paper", "filtered"):
        m = r[split][proto]
        print(f"{'':<12} {split:<6} {proto:<9} {m['Recall@10']:9.4f} {m['NDCG@10']:8.4f} {m['Recall@20']:9.4f} {m['NDCG@20']:8.4f}")
PY
echo "results in $out" >&2
