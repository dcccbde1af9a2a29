#!/usr/bin/env bash
# Issue #7's speed figures in one device call, results under $OUT: head dims (with and without the
# two-slab split), masks, decode, backward. Usage: bash scripts/gpu_features_bench.sh [step]...
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/quantattn-out}
mkdir -p "$OUT"
steps=${*:-headdims masks decode backward}
for step in $steps; do
  echo "=== $step ($(date -u +%T))"
  case $step in
    headdims)
      timeout 200 python3 -m quantattn.bench --head-dims 64 80 96 128 160 192 256 --seq-lens 4K 16K --causal off \
        --variants sage2-8b sage1 sdpa-cudnn sdpa-flash --no-accuracy --out "$OUT" --tag headdims 2>&1 \
        | tee "$OUT/headdims.txt" | tail -45
      QUANTATTN_SPLIT_HEAD_DIM=0 timeout 100 python3 -m quantattn.bench --head-dims 80 96 160 192 --seq-lens 4K 16K \
        --causal off --variants sage2-8b sage1 --no-accuracy --out "$OUT" --tag headdims_nosplit 2>&1 \
        | tee "$OUT/headdims_nosplit.txt" | tail -25 ;;
    masks) timeout 150 python3 -m quantattn.bench.masks --out "$OUT" 2>&1 | tee "$OUT/masks.txt" | tail -15 ;;
    decode) timeout 200 python3 -m quantattn.bench.decode --out "$OUT" 2>&1 | tee "$OUT/decode.txt" | tail -30 ;;
    backward) timeout 200 python3 -m quantattn.bench.backward --quick --causal both --out "$OUT/backward.json" 2>&1 \
      | tee "$OUT/backward.txt" | tail -20 ;;
    *) echo "unknown step $step" ;;
  esac
done
