#!/usr/bin/env bash
# One GPU session in one command: the environment (GPU, clocks, driver, torch, triton, CUDA, commit) to
# $OUT/env.txt, then the named steps, each with its log under $OUT (default /tmp/quantattn-out).
#   tests      the GPU suite, as `make test-gpu` runs it (scripts/test_gpu.sh)
#   accuracy   the accuracy tables on the Triton kernels (python -m quantattn.accuracy)
#   quick      the benchmark's quick run (head_dim 128, N 1K 4K 16K, not causal)
#   protocol   the benchmark run that a speed table is made from: head_dim 128 and 64, causal off and on,
#              N 1K-32K, the quantattn backends next to SDPA cuDNN and flash, no accuracy slice; the
#              result is $OUT/<date>_<GPU>_speed_table.json
#   table      the speed table of that run, to $OUT/speed_tables/ (python -m quantattn.bench.speed_table,
#              SDPA only where it wins by more than MARGIN, default 0.05 as in the shipped H100 table)
#   workloads  real models' attention shapes against cuDNN and backend="auto" (--workloads)
# Usage (GPU machine, repository root): [OUT=DIR] bash scripts/gpu_session.sh [STEP]...
#   (default: tests accuracy quick)
# To ship a GPU model's speed table: `bash scripts/gpu_session.sh protocol table`, copy the protocol JSON
# to bench/results/ (with a row in bench/results/README.md), then in the repository
# `make speed-table RESULTS="bench/results/<that file> [earlier runs of the same GPU model]" ARGS="--margin 0.05"`.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/quantattn-out}
mkdir -p "$OUT"
steps=${*:-tests accuracy quick}
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git log -1 --format='commit %H %s' 2>/dev/null || true; date -u; } | tee "$OUT/env.txt"
# the GPU's name as a file-name part (the benchmark's own slug rule), for the protocol run's tag
gpu=$(python3 -c "import re, torch; print(re.sub(r'[^A-Za-z0-9._-]+', '-', torch.cuda.get_device_name().replace('NVIDIA ', '')))" \
  2>/dev/null || echo gpu)
for step in $steps; do
  echo "=== $step ($(date -u +%T))"
  case $step in
    tests) timeout 580 bash scripts/test_gpu.sh -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25 ;;
    accuracy) timeout 120 python3 -m quantattn.accuracy --backend triton --json "$OUT/accuracy_gpu.json" 2>&1 \
                | tee "$OUT/accuracy_gpu.txt" ;;
    quick) timeout 400 python3 -m quantattn.bench --quick --out "$OUT" 2>&1 | tee "$OUT/bench_quick.txt" | tail -40 ;;
    protocol) timeout 480 python3 -m quantattn.bench --head-dims 128 64 --causal both \
                --variants sage2-8b sage2-8b-hopper sage1 sdpa-cudnn sdpa-flash --no-accuracy \
                --out "$OUT" --tag "${gpu}_speed_table" --stop-after 420 2>&1 | tee "$OUT/bench_protocol.txt" | tail -45 ;;
    table) python3 -m quantattn.bench.speed_table "$OUT"/*_"${gpu}"_speed_table.json --out "$OUT/speed_tables/" \
             --margin "${MARGIN:-0.05}" 2>&1 \
             | tee "$OUT/speed_table.txt" ;;
    workloads) timeout 540 python3 -m quantattn.bench --workloads --out "$OUT" 2>&1 | tee "$OUT/workloads.txt" | tail -30 ;;
    *) echo "unknown step $step (steps: tests accuracy quick protocol table workloads)" ;;
  esac
done
