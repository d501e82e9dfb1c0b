# Set-up and everyday commands. `make serve` and `make test` each create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

$(BIN)/glipv2: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $@

.PHONY: install serve test lint typecheck
install: $(BIN)/glipv2

# ONNX Runtime (the faster runtime on a CPU) on an export of the model made at the first start and
# cached in var/engines/; GLIPV2_RUNTIME=pytorch make serve for PyTorch eager.
serve: export GLIPV2_RUNTIME ?= onnxruntime
serve: $(BIN)/glipv2
	$(BIN)/glipv2 serve

# ruff; the import layers (cli -> benchmarks -> service -> engines -> model_export)
lint: $(BIN)/glipv2
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(BIN)/glipv2
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -q
