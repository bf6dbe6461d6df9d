# Signery developer entry points. Each target creates .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo serve test test-sqlite test-postgresql lint typecheck bench bench-tsa clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

## demo: start a real server on a temporary data dir and walk the whole lifecycle
demo: $(STAMP)
	$(PY) -m demo --out demo-out

## serve: a server for real use on the embedded defaults (data in ./signery-data)
serve: $(STAMP)
	test -f signery-data/master.key || $(VENV)/bin/signery init --data-dir signery-data
	$(VENV)/bin/signery serve --data-dir signery-data

## test: lint, types, then the whole suite against SQLite and PostgreSQL
test: lint typecheck
	$(PY) -m pytest --cov --cov-report=term:skip-covered -q -n auto --dist loadscope

lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests bench devtools demo
	$(VENV)/bin/ruff check src tests bench devtools demo

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## bench: signatures/s and latency over HTTP next to raw cryptography, then the
## client: hashing, memory, Authenticode, many files (not part of test)
bench: $(STAMP)
	$(PY) bench/sign_throughput.py
	$(PY) bench/client_throughput.py
	$(PY) bench/agent_throughput.py

## bench-tsa: RFC 3161 timestamps/s over HTTP next to raw signing (not part of test)
bench-tsa: $(STAMP)
	$(PY) bench/tsa_throughput.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache .coverage
