#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md, in sections that fit one 10-minute device call each:
#   bash benchmarks/gpu_session.sh kernels rollout      # Triton tests on CUDA, log-prob throughput, rollout speed
#   bash benchmarks/gpu_session.sh memory               # real-size GRPO / DPO memory and step time
#   bash benchmarks/gpu_session.sh kl                   # the fused KL kernel against the chunked and full-logits paths
#   bash benchmarks/gpu_session.sh essa                 # ESSA population throughput, batched vs sequential
#   bash benchmarks/gpu_session.sh tests memory15 kl rollout_short   # one 10-minute call: the quick proof
#   bash benchmarks/gpu_session.sh tests memory05 expandable
# The next session (RESULTS.md, "On an H200"): the nf4 rows again after the fp32-upcast fix, and the reserved memory:
#   bash benchmarks/gpu_session.sh tests memory15 expandable        # ~8 minutes; bitsandbytes unpacked in .gpu/site
#   bash benchmarks/gpu_session.sh fits8                            # does 1.5B nf4 GRPO / DPO run in 7 GiB
# Runs on a machine with one CUDA GPU and python3 holding torch, triton, transformers and peft. Missing
# packages (bitsandbytes; TRL for vs_trl.py) sit unpacked in .gpu/site: `bash scripts/gpu_site.sh [trl]` here, then
# carry .gpu. Every table goes to stdout and to $OUT/<section>.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
[ -d .gpu/site ] && export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
# editable, as CI installs it: the package maps the top-level kernels/ folder to lowalign.kernels
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail -20 "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/device.txt"

section() {  # section NAME SECONDS COMMAND...: run with a time limit, tee the output to $OUT/NAME.md
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s)"
  timeout "$limit" "$@" 2>"$OUT/$name.err" | tee -a "$OUT/$name.md"
  echo "=== $name exit ${PIPESTATUS[0]}"; tail -3 "$OUT/$name.err"
}

for s in "$@"; do
  case $s in
    kernels)
      section kernel_tests 150 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_logprobs_triton.py \
        tests/kernels/test_kl.py
      section logprobs_frozen 200 python3 benchmarks/bench_logprobs.py --frozen --reps 5 \
        --shapes 8192x128256x4096 8192x151936x1536
      section logprobs_trainable 120 python3 benchmarks/bench_logprobs.py --reps 5 --shapes 8192x128256x4096 ;;
    tests)  # every case, compiled in parallel (a failure list, not the first failure)
      section kernel_tests 150 python3 -m pytest -q -n 8 -p no:cacheprovider tests/kernels/test_logprobs_triton.py \
        tests/kernels/test_kl.py ;;
    sweep)
      section sweep 200 python3 benchmarks/bench_logprobs.py --frozen --reps 3 --shapes 8192x151936x1536 --sweep \
        64,128,64,4,3 128,128,64,8,3 128,256,64,8,3 64,256,64,8,3 64,128,64,8,4 128,128,32,4,3 ;;
    rollout)
      section rollout_05b 300 python3 benchmarks/bench_rollout.py --size 0.5b --reps 1 --variant-timeout 140 \
        --json "$OUT/rollout_05b.json" ;;
    rollout15)
      section rollout_15b 240 python3 benchmarks/bench_rollout.py --size 1.5b --quantization nf4 ;;
    memory15)  # the 1.5B rows only: nf4 and bf16, GRPO and DPO
      section memory15 220 python3 benchmarks/gpu_memory.py --sizes 1.5b --json "$OUT/memory15.json" ;;
    memory05)
      section memory05 170 python3 benchmarks/gpu_memory.py --sizes 0.5b --json "$OUT/memory05.json" ;;
    expandable)  # the 1.5B nf4 GRPO row again with the allocator's expandable segments (reserved vs allocated)
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True section expandable 150 python3 benchmarks/gpu_memory.py \
        --sizes 1.5b --quantizations nf4 --algorithms grpo --json "$OUT/expandable.json" ;;
    fits8)  # the 1.5B nf4 rows on an allocator capped at 7 GiB: does GRPO / DPO fit an 8 GB card (fragmentation too)
      section fits8 200 python3 benchmarks/gpu_memory.py --sizes 1.5b --quantizations nf4 --cap-gib 7 \
        --json "$OUT/fits8.json" ;;
    vs_trl)  # both tools on the GPU, random 152k-vocabulary model (needs `bash scripts/gpu_site.sh trl`)
      section vs_trl 420 python3 benchmarks/vs_trl.py --quick --device cuda --json "$OUT/vs_trl.json" ;;
    rollout_short)
      section rollout_short 80 python3 benchmarks/bench_rollout.py --size 0.5b --reps 1 --variants dynamic static \
        --variant-timeout 45 --json "$OUT/rollout_short.json" ;;
    memory)
      section memory 480 python3 benchmarks/gpu_memory.py --json "$OUT/memory.json" ;;
    essa)  # issue #14: batched population vs one member per generation call, where batching is meant to pay
      section essa_tiny 200 python3 benchmarks/es_vs_grpo.py --throughput-only --quantization none
      section essa_05b 300 python3 benchmarks/es_vs_grpo.py --throughput-only --size 0.5b --quantization none \
        --populations 8 32 --prompts 64 ;;
    kl)
      section kl 70 python3 benchmarks/bench_kl.py --device cuda --dtype bfloat16 \
        --shapes 8192x151936x1536 4096x128256x4096 ;;
    *) echo "unknown section $s"; exit 2 ;;
  esac
done
