# The few commands a contributor needs. PYTHON picks the interpreter (default: python3 on PATH);
# ARGS passes options through, e.g. `make test ARGS="-k varlen"`, `make bench ARGS="--help"`.
PYTHON ?= python3
ARGS ?=

.PHONY: install test test-gpu lint format bench accuracy speed-table

install:  ## quantattn in editable mode, with test, benchmark and lint tools
	$(PYTHON) -m pip install -e ".[dev]"

test:  ## the README's test command: every test, GPU tests skip without a GPU
	PYTHON="$(PYTHON)" bash scripts/test.sh $(ARGS)

test-gpu:  ## the GPU tests: in parallel (pytest-xdist, -n auto), then the gpu_serial ones alone
	PYTHON="$(PYTHON)" bash scripts/test_gpu.sh $(ARGS)

lint:  ## ruff: no lint findings, code formatted
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:  ## apply the formatter and the safe lint fixes
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

bench:  ## the speed benchmark (NVIDIA GPU)
	$(PYTHON) -m quantattn.bench $(ARGS)

accuracy:  ## the accuracy tool
	$(PYTHON) -m quantattn.accuracy $(ARGS)

# The shipped speed table of a GPU model (backend="auto" hands to torch SDPA what SDPA won there), from
# committed bench results of that GPU: make speed-table RESULTS="bench/results/A.json bench/results/B.json"
# (the shipped H100 table: ARGS="--margin 0.05"). `bash scripts/gpu_session.sh protocol table` makes such a
# run on the GPU machine; docs/benchmarking.md says how the table is computed.
RESULTS ?=
speed-table:  ## write quantattn/backends/speed_tables/<gpu>.json from RESULTS (bench JSON files)
	$(PYTHON) -m quantattn.bench.speed_table $(RESULTS) --out quantattn/backends/speed_tables/ $(ARGS)
