# Two commands matter (see README.md): `make demo` runs the pipeline, `make test` runs the tests.
# Both create .venv on first use: the CPU build of torch first (so pip never pulls CUDA wheels), then sail.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps 'clip_benchmark>=1.6'  # its metric modules, for the tests (see pyproject's dev)
	touch $@

demo: setup
	$(BIN)/sail demo

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/loss.py --quick
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/align_step.py

clean:
	rm -rf $(VENV) runs features/*/
