# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv on first use and install the project into it.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned to the CPU wheel that pip finds on this machine's disk; asking
# for it first keeps the later resolve from pulling a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test lint models evaluate bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/anomaly-sidecar demo

test: $(STAMP) lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/hadolint docker/Dockerfile

models: $(STAMP)
	$(BIN)/anomaly-sidecar train --dataset ton_iot --data ../shared/data/ton_iot_telemetry --out models

evaluate: $(STAMP)
	$(BIN)/anomaly-sidecar evaluate --dataset ton_iot --data ../shared/data/ton_iot_telemetry --json out/evaluate.json

# Starts its own Mosquitto on a free loopback port (needs `mosquitto` on PATH
# or in /usr/sbin), prints the table and writes out/bench.json; about 5 min.
bench: $(STAMP)
	$(BIN)/anomaly-sidecar bench --start-mosquitto --json out/bench.json

clean:
	rm -rf $(VENV) out
