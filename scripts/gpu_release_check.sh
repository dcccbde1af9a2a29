#!/usr/bin/env bash
# A release check of the Hopper path as a user gets it, in one command: a wheel built from this tree,
# installed apart from the checkout, the CUDA toolkit hidden (no nvcc, no CUDA_HOME; moved back on exit)
# and an empty kernel cache; then first-call and host-time figures (scripts/call_costs.py),
# `python -m quantattn.info`, and the GPU suite against the installed wheel in its two steps (in parallel
# with pytest-xdist, then the gpu_serial tests alone). Logs under $OUT (default /tmp/quantattn-out).
# Usage (GPU machine, repository root; it moves /usr/local/cuda while it runs, so a machine of your own):
#   [OUT=DIR] [WORKERS=8] bash scripts/gpu_release_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/quantattn-out}
mkdir -p "$OUT"
log() { echo "=== $* ($(date -u +%T))"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

log "wheel"
rm -rf /tmp/whl /tmp/wheelsite /tmp/wheeltests
python3 -m pip wheel . --no-deps --no-build-isolation -q -w /tmp/whl > "$OUT/wheel.log" 2>&1 || { tail -20 "$OUT/wheel.log"; exit 1; }
python3 -m pip install --no-deps -q --target /tmp/wheelsite /tmp/whl/quantattn-*.whl >> "$OUT/wheel.log" 2>&1
ls /tmp/whl; find /tmp/wheelsite/quantattn/hopper -name "*.cu*" | wc -l

log "hiding the CUDA toolkit"
cuda_dir=$(readlink -f /usr/local/cuda)
[ -d "$cuda_dir" ] && mv "$cuda_dir" /opt/cuda-hidden
trap '[ -d /opt/cuda-hidden ] && mv /opt/cuda-hidden "$cuda_dir"' EXIT
unset CUDA_HOME CUDA_PATH
export PATH=$(echo "$PATH" | tr ':' '\n' | grep -v -i cuda | paste -sd:)
echo "nvcc: $(command -v nvcc || echo none)"
cp -r tests /tmp/wheeltests && cp pyproject.toml /tmp/wheeltests/
cd /tmp/wheeltests
export PYTHONPATH=/tmp/wheelsite QUANTATTN_CACHE=/tmp/qa-release
python3 -c "import quantattn, quantattn.hopper as h; print(quantattn.__file__); print('hopper:', h.unavailable_reason() or 'available')"
log "first call, empty cache"; python3 "$OLDPWD/scripts/call_costs.py" first
log "first call, warm cache"; python3 "$OLDPWD/scripts/call_costs.py" first
python3 "$OLDPWD/scripts/call_costs.py" host
python3 -m quantattn.info > "$OUT/info.txt" 2>&1; cat "$OUT/info.txt"

log "GPU suite on the wheel: parallel step (-n ${WORKERS:-8}), then the gpu_serial tests alone"
start=$SECONDS
timeout 330 python3 -m pytest . -m "gpu and not gpu_serial" -n "${WORKERS:-8}" -q -p no:cacheprovider -rfE \
  > "$OUT/gpu_parallel.log" 2>&1
echo "parallel: exit $? after $((SECONDS - start)) s: $(tail -1 "$OUT/gpu_parallel.log")"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_parallel.log" | head -30
mid=$SECONDS
timeout 200 python3 -m pytest . -m gpu_serial -q -p no:cacheprovider -rfE > "$OUT/gpu_serial.log" 2>&1
echo "serial: exit $? after $((SECONDS - mid)) s: $(tail -1 "$OUT/gpu_serial.log")"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_serial.log" | head -30
log done
