# Two commands on a fresh machine: `make dev` runs the loop, `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: dev test lint bench

$(BIN)/loopai: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

dev: $(BIN)/loopai
	$(BIN)/loopai dev

# Three test processes on two cores: most tests wait on the broker and on group joins, not on a CPU.
test: $(BIN)/loopai
	$(BIN)/python -m pytest -q -n 3 --dist loadfile

lint: $(BIN)/loopai
	$(BIN)/ruff check app devtools tests bench examples
	$(BIN)/mypy app devtools

bench: $(BIN)/loopai
	$(BIN)/python -m bench --rounds 5
