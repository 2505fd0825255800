#!/usr/bin/env bash
# One-command GPU check (about 2-4 minutes on one H100/H200, hard limit 9 minutes): the tests that need
# CUDA (marked `cuda`), then `hart benchmark` for hart-0.7b-1024 (random weights, with the Qwen2-1.5B-size
# text model: it costs milliseconds on such a GPU) in bf16 at batch 1 and 8, printing the figures.
#   usage: scripts/gpu_check.sh [OUT_DIR]      (default ./gpu_check; JSON + PNG land there)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check}
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "gpu_check: no CUDA device visible to torch")'

echo "== tests marked cuda =="
tests=0
timeout 180 python -m pytest -q -m cuda tests || tests=$?
if [ "$tests" -eq 5 ]; then echo "(no tests are marked cuda yet)"; tests=0; fi

echo "== benchmark: hart-0.7b-1024, bf16, cuda, batch 1 and 8 =="
timeout 360 python scripts/benchmark.py --config hart-0.7b-1024 --dtype bf16 --device cuda \
    --batch-size 1 --batch-size 8 --warmup 1 --iters 3 --out "$out"

if [ "$tests" -ne 0 ]; then echo "gpu_check: the cuda tests failed (pytest exit $tests)"; exit "$tests"; fi
echo "gpu_check: done"
