#!/usr/bin/env bash
# Sequence-parallel quantattn on this host's GPUs: the distributed GPU tests (the `gpu` tests whose names
# say "distributed"), then the scaling benchmark (python -m quantattn.distributed.bench); logs and JSON in OUT_DIR.
# Usage, from the repository root: bash scripts/gpu_distributed.sh [OUT_DIR]   (default /tmp/quantattn-distributed)
# With 2 GPUs: every test, and 1 GPU vs 2 GPUs for Ulysses and ring at 64K-256K tokens (3 to 5 minutes; at most 10).
# With 1 GPU: the 2-GPU tests skip (pytest says so) and the benchmark times the 1-GPU calls and the modes
# on a group of one, and lists the 2-GPU rows as not run.
set -uo pipefail
export NCCL_NVLS_ENABLE=0  # NVLink multicast off: on a shared host it can take GPUs out of service
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${1:-/tmp/quantattn-distributed}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
  nvidia-smi topo -m 2>/dev/null || true
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), "triton", triton.__version__, "gpus", torch.cuda.device_count())'
  git log -1 --format='commit %H %s' 2>/dev/null || true; date -u; } 2>&1 | tee "$OUT/env.txt"
echo "=== tests ($(date -u +%T))"
timeout 300 python3 -m pytest tests -m gpu -k distributed -q -rs -p no:cacheprovider -o addopts="" 2>&1 \
  | tee "$OUT/pytest_distributed_gpu.log" | tail -30
tests_rc=${PIPESTATUS[0]}
echo "=== benchmark ($(date -u +%T))"
timeout 270 python3 -m quantattn.distributed.bench --out "$OUT" 2>&1 | tee "$OUT/bench_distributed.txt" | grep -v '^\[rank 0\]'
bench_rc=${PIPESTATUS[0]}
echo "=== done ($(date -u +%T)): tests exit $tests_rc, benchmark exit $bench_rc; results in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
