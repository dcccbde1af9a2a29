#!/usr/bin/env bash
# The GPU test suite in two steps (`make test-gpu` runs this file):
#   1. every `gpu` test that can share the GPU, in parallel: pytest-xdist, one worker per CPU core
#      (most of the time is Triton compiling kernels, which the workers do side by side);
#   2. the `gpu_serial` tests (memory peaks, 128K+ keys, their own GPU processes, several GPUs), one at a
#      time, with the GPU to themselves.
# Extra arguments go to both pytest runs (e.g. `bash scripts/test_gpu.sh -x`); WORKERS overrides -n.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
start=$(date +%s)
"$PY" -m pytest tests -m "gpu and not gpu_serial" -n "${WORKERS:-auto}" --durations=10 "$@"
parallel=$?
mid=$(date +%s)
"$PY" -m pytest tests -m gpu_serial --durations=10 "$@"
serial=$?
end=$(date +%s)
echo "GPU suite: parallel step $((mid - start)) s (exit $parallel), serial step $((end - mid)) s (exit $serial)"
# pytest's 5 means "no tests collected" (no GPU tests selected): not a failure of the suite
for rc in "$parallel" "$serial"; do
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
done
