#!/usr/bin/env bash
# Runs every tiny recipe as its README/issue acceptance command and prints the summary numbers.
#   bash benchmarks/run_recipes.sh [OUT_DIR]      (default runs/acceptance; ~36 minutes on 2 CPU cores)
#   ONLY="rm_tiny ppo_rm_tiny" bash benchmarks/run_recipes.sh /tmp/acc   # a subset, same table
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/acceptance}
LA=.venv/bin/lowalign
run() {  # name, then lowalign run arguments
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  rm -rf "${OUT:?}/$name"
  local t0=$SECONDS
  $LA run "$@" output_dir="$OUT/$name" > "$OUT/$name.log" 2>&1 || { echo "$name FAILED"; tail -20 "$OUT/$name.log"; exit 1; }
  .venv/bin/python - "$OUT/$name/summary.json" "$name" $((SECONDS - t0)) <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
keys = [k for k in ("accuracy", "preference_accuracy", "label_accuracy", "pairwise_accuracy") if k in s["final"]]
parts = [f"{k}: {s['baseline'][k]:.3f} -> {s['final'][k]:.3f} ({100 * (s['final'][k] - s['baseline'][k]):+.1f} pts)"
         for k in keys]
extra = ""
if "inference_peak_memory_bytes" in s:
    extra = (f", inference-pass peak {s['inference_peak_memory_bytes'] / 2**20:.0f} MiB, "
             f"ratio {s['peak_memory_ratio_to_inference']:.2f}")
print(f"| {sys.argv[2]} | {'; '.join(parts)} | {sys.argv[3]} | {s['wall_time_s']:.0f} | "
      f"{s['peak_memory_bytes'] / 2**20:.0f}{extra} |")
PY
}
mkdir -p "$OUT"
echo "| recipe | held-out metric, before -> after | wall s (process) | wall s (summary) | peak MiB |"
echo "|---|---|---|---|---|"
run grpo_tiny recipes/grpo_tiny.yaml
run grpo_tiny_nf4 recipes/grpo_tiny.yaml model.quantization=nf4
run dpo_tiny recipes/dpo_tiny.yaml
run orpo_tiny recipes/orpo_tiny.yaml
run simpo_tiny recipes/simpo_tiny.yaml
run kto_tiny recipes/kto_tiny.yaml
run tdpo_tiny recipes/tdpo_tiny.yaml
run remax_tiny recipes/remax_tiny.yaml
run reinforcepp_tiny recipes/reinforcepp_tiny.yaml
run raft_tiny recipes/raft_tiny.yaml
run superhf_tiny recipes/superhf_tiny.yaml
run rm_ratings_tiny recipes/rm_ratings_tiny.yaml
run grpo_multiobjective_tiny recipes/grpo_multiobjective_tiny.yaml "rewards.0.path=$OUT/rm_ratings_tiny"
run grpo_multiobjective_rm_only recipes/grpo_multiobjective_tiny.yaml "rewards.0.path=$OUT/rm_ratings_tiny" \
  "rewards=[{adapter: reward, path: $OUT/rm_ratings_tiny, attribute_weights: {correctness: 1.0, format: 0.1, length: 0.1}}]"
run rm_tiny recipes/rm_tiny.yaml
run grpo_rm_tiny recipes/grpo_rm_tiny.yaml "rewards.0.path=$OUT/rm_tiny"
run es_tiny recipes/es_tiny.yaml
run ppo_tiny recipes/ppo_tiny.yaml
run ppo_tiny_shared_nf4 recipes/ppo_tiny.yaml train.critic=shared model.quantization=nf4
run ppo_rm_tiny recipes/ppo_rm_tiny.yaml "rewards.0.path=$OUT/rm_tiny"
