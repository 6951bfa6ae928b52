# Two entry points for a fresh machine:
#   make bench   set up a venv, build the kernels, run the CPU benchmarks and draw the charts
#   make test    set up if needed, build, run the tests
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH_ARGS ?=
TEST_ARGS ?=

.PHONY: setup build bench test clean

setup: $(VENV)/.installed

# requirements.txt pins every package (torch 2.13.0 is the CPU build, from local disk where cached).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Incremental: CMake rebuilds only what changed under csrc/.
build: setup
	$(PY) -m pip install -q -e . --no-build-isolation --no-deps

# Headline cases of every suite (a few minutes on 2 cores); BENCH_ARGS="--quick" or "--full" to resize.
# Writes bench/out/report.md and report.html.
bench: build
	$(PY) bench/run.py $(BENCH_ARGS)

test: build
	$(PY) -m pytest $(TEST_ARGS)

clean:
	rm -rf build $(VENV) llama_kernels/_C*.so *.egg-info bench/out
