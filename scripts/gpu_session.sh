#!/usr/bin/env bash
# One device call: environment, GPU tests, accuracy table, kernel facts and speed lines, quick benchmark.
# Usage (on the GPU machine, from the repository root): bash scripts/gpu_session.sh [tests|accuracy|inspect|bench]...
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/quantattn-out}
mkdir -p "$OUT"
steps=${*:-tests accuracy inspect}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git log -1 --format='commit %H %s' 2>/dev/null || true; date -u; } | tee "$OUT/env.txt"
for step in $steps; do
  echo "=== $step ($(date -u +%T))"
  case $step in
    tests) timeout 330 python3 -m pytest tests/gpu -m gpu -q -x -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25 ;;
    accuracy) timeout 120 python3 -m quantattn.accuracy --backend triton --json "$OUT/accuracy_gpu.json" 2>&1 | tee "$OUT/accuracy_gpu.txt" ;;
    inspect) timeout 120 python3 scripts/gpu_inspect.py --json "$OUT/inspect.json" 2>&1 | tee "$OUT/inspect.txt" ;;
    bench) timeout 400 python3 -m quantattn.bench --quick --out "$OUT" 2>&1 | tee "$OUT/bench.txt" | tail -40 ;;
    *) echo "unknown step $step" ;;
  esac
done
