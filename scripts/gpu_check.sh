#!/usr/bin/env bash
# One-command GPU check (about 2-4 minutes on one H100/H200, hard limit 9 minutes): the tests that need
# CUDA (marked `cuda`), then `hart benchmark --compare --compile` for hart-0.7b-1024 (random weights, with the
# Qwen2-1.5B-size text model: it costs milliseconds on such a GPU) in bf16 at batch 1 and 8: the plain,
# exact (compiled, compacted text keys) and fast (plus pruning) runs, printing the figures.
# Without a CUDA device it says so and runs the same steps on the CPU with the tiny configuration in fp32
# (the cuda tests skip), which checks the script itself; those are not GPU figures.
#   usage: scripts/gpu_check.sh [OUT_DIR]      (default ./gpu_check; JSON + PNG land there)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}

if python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  config=hart-0.7b-1024 dtype=bf16 device=cuda
else
  echo "gpu_check: no CUDA device visible to torch: CPU fallback (tiny configuration, fp32); these are not GPU figures"
  config=tiny dtype=fp32 device=cpu
fi

echo "== tests marked cuda =="
tests=0
timeout 180 python -m pytest -q -m cuda -p no:cacheprovider tests || tests=$?
if [ "$tests" -eq 5 ]; then echo "(no tests are marked cuda)"; tests=0; fi

echo "== benchmark --compare: $config, $dtype, $device, batch 1 and 8 =="
timeout 360 python scripts/benchmark.py --config "$config" --dtype "$dtype" --device "$device" --compare --compile \
    --batch-size 1 --batch-size 8 --warmup 2 --iters 3 --out "$out"

if [ "$tests" -ne 0 ]; then echo "gpu_check: the cuda tests failed (pytest exit $tests)"; exit "$tests"; fi
echo "gpu_check: done"
