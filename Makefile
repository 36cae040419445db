# trl_drpo set-up and checks. A fresh machine needs nothing but Python 3.10+ and make.
#
# torch is installed *first*, on its own: if any other package pulled it in, pip would pick a multi-GB CUDA build.
# GPU users choose their build:  make venv TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# or install their CUDA torch into an environment of their own and run `pip install -e ".[dev]"` there.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.trl_drpo-installed

.PHONY: venv demo test bench bench-world lint format clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The main job on its embedded default: offline, CPU, about 10 minutes.
demo: venv
	$(PY) -m trl_drpo.demo

# Two workers of one thread each: most tests are small models whose time is Python overhead, not arithmetic.
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

# Measurements (FLOPs per update, CPU timings, memory vs K): writes benchmarks/results/ and the README table.
bench: venv
	$(PY) -m benchmarks.run_all --update-readme

# DrPO against DRaFT, DPO1step and Neighbor-GRPO in the digit world, the same wall-clock each (about 40 min on 2 cores):
# writes benchmarks/results/world_comparison.{json,md,png}.
bench-world: venv
	$(PY) -m benchmarks.world_comparison

lint: venv
	$(PY) -m ruff check trl_drpo tests examples benchmarks
	$(PY) -m ruff format --check trl_drpo tests examples benchmarks

format: venv
	$(PY) -m ruff check --fix trl_drpo tests examples benchmarks
	$(PY) -m ruff format trl_drpo tests examples benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
