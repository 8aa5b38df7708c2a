# Quick start: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/demo.yaml

# Local, offline-friendly defaults shared by every target (see ../shared/STACK-NOTES.md).
export RAY_AUTH_MODE ?= disabled
export MLFLOW_DISABLE_TELEMETRY ?= true
export HF_HUB_OFFLINE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: install demo test bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,examples]"
	touch $(STAMP)

demo: $(STAMP) work/digits/docs.jsonl
	$(BIN)/omni run --config $(CONFIG)

# The demo's corpus, built once (same bytes every time): digits, speech, videos, sums.
work/digits/docs.jsonl: | $(STAMP)
	$(BIN)/omni examples digits --out work/digits

test: $(STAMP)
	$(BIN)/python -m pytest --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/shard_throughput.py
	$(BIN)/python benchmarks/tokenize_throughput.py
	$(BIN)/python benchmarks/pretokenize_throughput.py
	$(BIN)/python benchmarks/generation_speed.py
	$(BIN)/python benchmarks/eval_throughput.py
	$(BIN)/python benchmarks/trainer_overhead.py
	$(BIN)/python benchmarks/modality_batching.py
	$(BIN)/python benchmarks/tokenizer_quality.py
	$(BIN)/python benchmarks/cli_latency.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf work .pytest_cache .ruff_cache
