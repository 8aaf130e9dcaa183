# Two commands set everything up on a fresh machine (Python 3.11 + pip): `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements-cpu.txt setup.py | cksum | cut -d' ' -f1)
DEMO_DIR ?= out/demo
# Multi-process CPU runs are 3-20x slower with more OpenMP threads than cores per process.
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test compare clean

venv: $(STAMP)

$(STAMP): requirements-cpu.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-cpu.txt
	$(PY) -m pip install -q --no-deps torchrec==1.8.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

demo: venv
	$(VENV)/bin/muse-torchrec demo --out $(DEMO_DIR)

# The paper's comparison (6 methods) and the ESU ablations (paper Table 3), 3 seeds each, on CPU.
compare: venv
	$(VENV)/bin/muse-torchrec compare --config configs/methods/compare_cpu.yaml --seeds 3 --out out/compare
	$(VENV)/bin/muse-torchrec compare --config configs/methods/compare_cpu.yaml --seeds 3 --table3 --out out/compare

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) out
