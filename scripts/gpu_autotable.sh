#!/usr/bin/env bash
# Issue #19 item 5 and issue #18 lever 6 on the GPU: the speed-table tests, the protocol run that the shipped
# table is regenerated from, the table itself, and the real models' workloads (with auto's path for each).
# Usage (GPU machine, repository root): OUT=/path bash scripts/gpu_autotable.sh [tests|bench|table|workloads]...
# "table" reads $OUT/*_H100_autotable.json written by "bench" in the same OUT; copy it to bench/results/ and
# run `make speed-table RESULTS=bench/results/<that file>` in the repository to ship it.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/quantattn-out}
mkdir -p "$OUT"
steps=${*:-tests bench table workloads}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git log -1 --format='commit %H %s' 2>/dev/null || true; date -u; } | tee "$OUT/env.txt"
for step in $steps; do
  echo "=== $step ($(date -u +%T))"
  case $step in
    tests) timeout 300 python3 -m pytest tests/gpu/test_speed_table_gpu.py tests/gpu/test_integrations_gpu.py -m gpu -q \
             -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/pytest_autotable.log" | tail -25 ;;
    bench) timeout 480 python3 -m quantattn.bench --head-dims 128 64 --causal both \
             --variants sage2-8b sage2-8b-hopper sage1 sdpa-cudnn sdpa-flash --no-accuracy \
             --out "$OUT" --tag H100_autotable --stop-after 420 2>&1 | tee "$OUT/bench.log" | tail -45 ;;
    table) python3 -m quantattn.bench.speed_table "$OUT"/*_H100_autotable.json --out "$OUT/speed_tables/" 2>&1 \
             | tee "$OUT/speed_table.txt" ;;
    workloads) timeout 540 python3 -m quantattn.bench --workloads --out "$OUT" 2>&1 | tee "$OUT/workloads.log" | tail -30 ;;
    *) echo "unknown step $step" ;;
  esac
done
