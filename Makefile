# Two entry points for a fresh machine: `make demo` and `make test`. Both idempotent.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tdump-installed

.PHONY: demo test test-slow install lint typecheck pytest data sample-dumps bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Re-install only when the project's metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Real Fashion-MNIST from Debian where apt exists; the demo falls back to scikit-learn's digits otherwise.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ] || dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
		echo "note: could not install dataset-fashion-mnist; the demo will use scikit-learn's digits"; \
	else echo "note: apt-get not available; the demo will use scikit-learn's digits"; fi

demo: install data
	$(BIN)/python examples/demo.py

lint: install
	$(BIN)/ruff check tdump tests benchmarks examples
	$(BIN)/ruff format --check tdump tests benchmarks examples

typecheck: install
	$(BIN)/mypy

# Test processes (pytest-xdist); one test file stays on one worker, so its module fixtures run once.
# Most tests wait on subprocesses that import torch: two workers on 2 cores take 0.6x the time.
TEST_WORKERS ?= 2

# The slow tests (torchvision models over 50 M parameters, three long loop runs) run in CI after
# `make test`, in one process: two of the largest models at once would need twice the memory.
pytest: install
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

test: lint typecheck pytest

test-slow: install
	$(BIN)/python -m pytest -q -m slow

sample-dumps: install
	$(BIN)/python sample_dumps/make_sample.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache out
