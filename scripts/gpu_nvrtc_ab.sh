#!/usr/bin/env bash
# One device call: the Hopper backend built the old way (nvcc, .ab/old = a checkout of the last nvcc
# commit) against the NVRTC build of this tree, with the CUDA toolkit hidden for the latter: first-call
# time, host time per call, bit-for-bit outputs, GPU tests (xdist), benchmark rows side by side.
# Usage (GPU machine, repository root): bash scripts/gpu_nvrtc_ab.sh [tests] [bench]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/quantattn-out}
W=$OUT/work; mkdir -p "$W"
steps=" ${*:-tests bench} "
log() { echo "=== $* ($(date -u +%T))"; }
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  pip list 2>/dev/null | grep -i -E "nvidia|cuda" ; which nvcc; ls -la /usr/local/ | grep -i cuda; ldconfig -p | grep -E "nvrtc|libcuda\." ; } > "$W/env.txt" 2>&1
head -3 "$W/env.txt"

log "old: nvcc build"
( cd .ab/old && PYTHONPATH=$PWD timeout 120 python3 -m quantattn.hopper.build ) > "$W/old_build.txt" 2>&1; tail -1 "$W/old_build.txt"
OLD="env PYTHONPATH=$PWD/.ab/old"
$OLD python3 scripts/hopper_call_costs.py host 2>&1 | tee "$W/old_costs.txt"
$OLD python3 scripts/hopper_call_costs.py --save "$W/old.pt"

log "hiding the CUDA toolkit"
cuda_dir=$(readlink -f /usr/local/cuda)
[ -d "$cuda_dir" ] && mv "$cuda_dir" /opt/cuda-hidden
unset CUDA_HOME CUDA_PATH
export PATH=$(echo "$PATH" | tr ':' '\n' | grep -v -i cuda | paste -sd:)
echo "nvcc: $(command -v nvcc || echo none)"
NEW="env PYTHONPATH=$PWD QUANTATTN_CACHE=/tmp/qa-new"
$NEW python3 -c "from quantattn.hopper import compiler as c, driver as d, unavailable_reason as u; print('nvrtc', c.nvrtc().path, c.nvrtc().version, 'driver', d.driver_version(), 'hopper', u() or 'available')"
log "new: first call, empty cache"; $NEW python3 scripts/hopper_call_costs.py first | tee "$W/new_costs.txt"
log "new: first call, warm cache"; $NEW python3 scripts/hopper_call_costs.py first | tee -a "$W/new_costs.txt"
$NEW python3 scripts/hopper_call_costs.py host | tee -a "$W/new_costs.txt"
$NEW python3 scripts/hopper_call_costs.py where > "$W/new_where.txt" 2>&1
$NEW python3 scripts/hopper_call_costs.py --save "$W/new.pt"
log "old vs new outputs"; python3 scripts/hopper_call_costs.py --compare "$W/old.pt" "$W/new.pt" | tee -a "$W/new_costs.txt"
$NEW python3 -m quantattn.hopper.build > "$W/new_build.txt" 2>&1; tail -2 "$W/new_build.txt"

if [[ $steps == *" tests "* ]]; then
  log "GPU tests (hopper, hopper_preprocess), -n 8, toolkit hidden"
  $NEW timeout 300 python3 -m pytest tests/gpu/test_hopper_gpu.py tests/gpu/test_hopper_preprocess_gpu.py -n 8 -q \
    -p no:cacheprovider -o addopts="" -rfE > "$W/tests.log" 2>&1
  echo "exit $?: $(tail -1 "$W/tests.log")"; grep -E "^(FAILED|ERROR)" "$W/tests.log" | head -20
fi
if [[ $steps == *" bench "* ]]; then
  B="--head-dims 128 64 --seq-lens 1K 4K 16K --causal off --variants sage2-8b-hopper sdpa-cudnn --no-accuracy"
  log "bench new (NVRTC)"; $NEW timeout 200 python3 -m quantattn.bench $B --out "$W/bench_new" --tag nvrtc > "$W/bench_new.txt" 2>&1; tail -12 "$W/bench_new.txt"
  log "bench old (nvcc)"; $OLD timeout 200 python3 -m quantattn.bench $B --out "$W/bench_old" --tag nvcc > "$W/bench_old.txt" 2>&1; tail -12 "$W/bench_old.txt"
fi
[ -d /opt/cuda-hidden ] && mv /opt/cuda-hidden "$cuda_dir"
tar czf "$OUT/nvrtc_ab.tgz" -C "$OUT" work && rm -rf "$W"
log done
