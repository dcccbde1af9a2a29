#!/usr/bin/env bash
# GPU test files one by one, each under its own time limit, logs under $OUT (the device machine's
# result folder): bash scripts/gpu_tests.sh SECONDS_PER_FILE FILE...
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/quantattn-out}
mkdir -p "$OUT"
limit=$1
shift
for f in "$@"; do
  name=$(basename "$f" .py)
  echo "=== $f ($(date -u +%T))"
  timeout --signal=INT "$limit" python3 -m pytest "$f" -q -p no:cacheprovider -o addopts="" -rfE \
    > "$OUT/$name.log" 2>&1
  echo "exit $?: $(grep -E '^(=+ )?[0-9]+ (passed|failed)|error' "$OUT/$name.log" | tail -1)"
  grep -E '^(FAILED|ERROR)' "$OUT/$name.log" | head -20
done
