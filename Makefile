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

# First the system packages the tests need (Java 17, libjetty9-java, chromium, libseccomp2): a missing one stops
# here, named with its install command. Then the Connect jars and the compose client, fetched once into
# ~/.cache/loopai. Three test processes on two cores: most tests wait on the broker and on group joins.
test: $(BIN)/loopai
ifneq ($(PREREQUISITES),skip)
	$(BIN)/python -m devtools.prerequisites
endif
	$(BIN)/python -m devtools.connect >/dev/null
	$(BIN)/python -m devtools.compose >/dev/null
	$(BIN)/python -m pytest -q -n 3 --dist loadfile

lint: $(BIN)/loopai
	$(BIN)/ruff check app devtools tests bench examples
	$(BIN)/mypy app devtools

bench: $(BIN)/loopai
	$(BIN)/python -m bench --rounds 5
