# Entry points: `make demo`, `make test`, `make bench`. Each creates .venv on first use and
# installs only what it needs (its own stamp file), so `make demo` on a fresh clone installs
# no test-only package.
# torch is pinned first: the CPU build 2.13.0 is on this machine's package index,
# while an unpinned torch would pull several GB of CUDA packages.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(DEMO_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[demo]"
	touch $(DEMO_STAMP)

$(TEST_STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(TEST_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/pruning-ir demo

test: $(TEST_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(TEST_STAMP)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
