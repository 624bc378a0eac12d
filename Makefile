# `make quickstart` and `make test` set everything up on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: quickstart test test-fast wheel-check bench docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/kdcache quickstart --out quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

wheel-check: $(STAMP)
	.ci/wheel-check $(BIN)/python

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not s3"

docs: $(STAMP)
	$(BIN)/typer kdcache_cli.main utils docs --name kdcache --title "kdcache command reference" \
		--output docs/cli-reference.md

bench: $(STAMP)
	$(BIN)/python -m benchmarks --quick

clean:
	rm -rf quickstart .pytest_cache
