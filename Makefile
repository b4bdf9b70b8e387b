# Two commands matter (see README.md): `make demo` runs the pipeline, `make test` runs the tests.
# Both create .venv on first use: the CPU build of torch first (so pip never pulls CUDA wheels), then sail.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow bench peers clean

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

# the peers benchmarks/gpu.py times sail against (pure-Python wheels; on the GPU machine:
# pip install --no-deps benchmarks/peers/*.whl)
peers:
	$(PYTHON) -m pip download --no-deps -q -d benchmarks/peers siglip-kernel==0.1.2 open_clip_torch==3.3.0

clean:
	rm -rf $(VENV) runs features/*/
