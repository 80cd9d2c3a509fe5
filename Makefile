# Lorry's two commands: `make up` (the embedded stack) and `make test` (every test).
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
UV_VERSION := 0.13.8
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)

.PHONY: help venv engine-env demo-model up lint typecheck test test-fast bench clean

help:
	@echo "make up          run Lorry on its embedded default (SQLite, local vLLM CPU engine)"
	@echo "make test        install what is needed and run every test"
	@echo "make lint        ruff + mypy --strict"
	@echo "make bench       benchmarks with printed figures"

$(UV):
	python3 -m pip install --user --quiet "uv==$(UV_VERSION)"

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --quiet
	@touch $@

venv: $(VENV)/.synced

engine-env: venv
	$(PY) -m lorry.engine_env build

up: venv
	$(VENV)/bin/lorry up

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: venv engine-env lint
	$(VENV)/bin/pytest

test-fast: venv
	$(VENV)/bin/pytest -m "not vllm"

bench: venv engine-env
	$(VENV)/bin/python -m tests.bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
