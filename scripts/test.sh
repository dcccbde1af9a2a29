#!/usr/bin/env bash
# The project's test command: README ("Set up"), `make test` and .ci/run all run this file.
# Every test under tests/; those marked `gpu` skip themselves where there is no NVIDIA GPU.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k varlen -x`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# exec: a signal sent to this script (CI's time guard) reaches pytest itself, which then prints its summary.
exec "${PYTHON:-python3}" -m pytest tests --durations=15 "$@"
