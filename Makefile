# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs; nothing is installed by hand.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
DIST ?= dist
ARGS ?=

.PHONY: venv system-deps test lint typecheck demo bench dist clean

venv: $(STAMP)

$(STAMP): pyproject.toml server/pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ./server -e '.[test]'
	$(BIN)/python -m testbed.oldclients  # older pyspark clients for compatibility tests
	touch $@

system-deps:
	tools/system-deps.sh

test: $(STAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy --python-version 3.10
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy
	$(BIN)/mypy --python-version 3.10  # the oldest Python the packages declare

demo: $(STAMP) system-deps
	$(BIN)/python -m demo

bench: $(STAMP) system-deps
	$(BIN)/python -m benchmarks $(ARGS)

# The wheel of the workstation toolkit (kbclient + kbdaemon) into $(DIST)/, built offline by the
# venv's hatchling: `pip install dist/kbase_spark_connect-*.whl` or `pipx install dist/...whl`.
dist:
	test -x $(BIN)/python || $(MAKE) venv
	$(BIN)/python -m pip wheel --quiet --no-build-isolation --no-deps --wheel-dir $(DIST) .
	@ls $(DIST)/kbase_spark_connect-*.whl

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .bench .demo
