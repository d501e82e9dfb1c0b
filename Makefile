# Set-up and everyday commands. `make serve` and `make test` each create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

$(BIN)/glipv2: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

.PHONY: install serve test lint
install: $(BIN)/glipv2

serve: $(BIN)/glipv2
	$(BIN)/glipv2 serve

lint: $(BIN)/glipv2
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q
