#!/bin/bash
# A/B of the CUDA K/V preprocessing (quantattn/hopper/preprocess.cu) built with different -D flags, each
# timed by scripts/preprocess_sweep.py in its own process (CONFIGS: its chunking settings), in one device call.
# Usage (device): CONFIGS="64:512 16:512" bash scripts/gpu_prep_ab.sh "base:" "mb3:-DQUANTATTN_PREP_MIN_BLOCKS=3" ...
export PYTHONPATH=$PWD QUANTATTN_CACHE=/tmp/qa_cache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
FLAGS=$(python3 -c "from quantattn.hopper.build import NVCC_FLAGS; print(' '.join(NVCC_FLAGS))")
for spec in "$@"; do
  label=${spec%%:*}; defs=${spec#*:}
  $NVCC $FLAGS $defs -o /tmp/lib_$label.so quantattn/hopper/attention.cu quantattn/hopper/preprocess.cu &
done
wait
for spec in "$@"; do
  label=${spec%%:*}
  echo "== $label" | tee -a "$OUT/prep_ab.txt"
  QUANTATTN_HOPPER_LIB=/tmp/lib_$label.so timeout 150 python3 scripts/preprocess_sweep.py ${HEAD_DIMS:-128} 2>&1 | tee -a "$OUT/prep_ab.txt"
done
