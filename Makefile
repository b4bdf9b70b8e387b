# Two commands matter (see README.md): `make demo` runs the pipeline, `make test` runs the tests.
# Both create .venv on first use from the lock (requirements/lock.txt: every package at the exact version
# and hash the tests passed with, the CPU build of torch included), then sail itself without dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# where the CPU torch wheel of the lock lies on this kind of machine (pip's find-links here)
TORCH_WHEELS ?= /opt/wheels
LOCK_FLAGS = --python-version 3.11 --generate-hashes --find-links $(TORCH_WHEELS) --custom-compile-command 'make lock'

.PHONY: setup demo test test-slow bench peers clean lock lock-upgrade

setup: $(VENV)/.installed

# --no-build-isolation: sail's editable build uses the locked setuptools rather than fetching one unpinned
$(VENV)/.installed: pyproject.toml requirements/lock.txt requirements/lock-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r requirements/lock.txt
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements/lock-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# refresh the lock after a pyproject.toml change, keeping every pin that still fits (uv reads the old lock)
lock: setup
	$(BIN)/uv pip compile -q pyproject.toml requirements/lock.in --extra dev $(LOCK_FLAGS) -o requirements/lock.txt
	$(BIN)/uv pip compile -q requirements/nodeps.in --no-deps $(LOCK_FLAGS) -o requirements/lock-nodeps.txt

# move every pin to the newest release the ranges allow (then run `make test test-slow` before committing)
lock-upgrade: setup
	$(BIN)/uv pip compile -q pyproject.toml requirements/lock.in --extra dev $(LOCK_FLAGS) --upgrade -o requirements/lock.txt

demo: setup
	$(BIN)/sail demo

# the default tier on every core (pytest-xdist; a file's tests stay in one worker, so its module fixtures are built
# once); `make test PYTEST_ARGS=--module-times` adds wall and CPU seconds per module (README "Tests")
WORKERS ?= auto
test: setup
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile $(PYTEST_ARGS)

# the slow tier: torchrun, Triton's interpreter under gloo and its sm_90 compile, the wheel, Chromium, the real demo
test-slow: setup
	$(BIN)/python -m pytest -q -m slow -n $(WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/loss.py --quick
	$(BIN)/python benchmarks/extract.py
	$(BIN)/python benchmarks/loader.py
	$(BIN)/python benchmarks/align_step.py

# the peers benchmarks/gpu.py times sail against (pure-Python wheels; on the GPU machine:
# pip install --no-deps benchmarks/peers/*.whl); also the GPU JPEG decoder sail[gpu-decode] installs (30 MB, CUDA 13)
peers:
	$(PYTHON) -m pip download --no-deps -q -d benchmarks/peers siglip-kernel==0.1.2 open_clip_torch==3.3.0 \
		nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43

clean:
	rm -rf $(VENV) runs features/*/
