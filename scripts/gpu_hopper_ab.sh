#!/bin/bash
# A/B of Hopper kernel variants (-D flags or other sources), and ncu on the variants that NCU_LABELS
# names, in one device call.
# Usage (device): [NCU_LABELS="a"] [AB_D64=1] [AB_NS="1024 8192"] bash scripts/gpu_hopper_ab.sh "base:SRC=path/to/old.cu" "a:-DFLAG=1" ...
# (SRC: a copy of an earlier kernel beside wgmma.cuh, for a baseline in the same run)
export PYTHONPATH=$PWD QUANTATTN_CACHE=/tmp/qa_cache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NVCC=${CUDA_HOME:-/usr/local/cuda}/bin/nvcc
FLAGS=$(python3 -c "from quantattn.hopper.build import NVCC_FLAGS; print(' '.join(NVCC_FLAGS))")
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv | tee "$OUT/ab.txt"
for spec in "$@"; do
  label=${spec%%:*}; defs=${spec#*:}; src=quantattn/hopper/attention.cu
  case "$defs" in SRC=*) src=${defs#SRC=}; defs="";; esac  # another source (e.g. a baseline's copy)
  $NVCC $FLAGS $defs -o /tmp/lib_$label.so $src quantattn/hopper/preprocess.cu &
done
wait
for spec in "$@"; do
  label=${spec%%:*}
  QUANTATTN_HOPPER_LIB=/tmp/lib_$label.so python3 scripts/hopper_ab.py "$label" $AB_NS 2>&1 | tee -a "$OUT/ab.txt"
  [ -n "$AB_D64" ] && AB_HEAD_DIM=64 QUANTATTN_HOPPER_LIB=/tmp/lib_$label.so python3 scripts/hopper_ab.py "$label" $AB_NS 2>&1 | tee -a "$OUT/ab.txt"
done
if [ -n "$NCU_LABELS" ]; then
  for label in $NCU_LABELS; do
    for shape in "1 32 8192 128" "4 32 1024 128"; do
      tag=${label}_$(echo $shape | cut -d' ' -f3)
      QUANTATTN_HOPPER_LIB=/tmp/lib_$label.so timeout 240 ncu -k regex:sage_attention_hopper -s 1 -c 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
        --section SchedulerStats --section InstructionStats --section Occupancy --section SourceCounters \
        --metrics regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active \
        -o "$OUT/ncu_$tag" python3 scripts/hopper_ncu_one.py $shape > "$OUT/ncu_${tag}.txt" 2>&1
      ncu -i "$OUT/ncu_$tag.ncu-rep" --page details >> "$OUT/ncu_${tag}.txt" 2>&1
      ncu -i "$OUT/ncu_$tag.ncu-rep" --page raw --csv > "$OUT/ncu_${tag}_raw.csv" 2>&1
      ncu -i "$OUT/ncu_$tag.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_${tag}_sass.csv" 2>&1
      rm -f "$OUT/ncu_$tag.ncu-rep"
      grep -E "Duration|Issue Slots|Issued Warp|Eligible|Active Warps Per|pipe_(xu|alu|fma|tensor)_" "$OUT/ncu_${tag}.txt" | head -30
    done
  done
fi
echo "== A/B"; cat "$OUT/ab.txt"
