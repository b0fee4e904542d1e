# The two commands a user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= work/demo

.PHONY: setup demo test bench clean

setup: $(VENV)/.derl-installed

$(VENV)/.derl-installed: requirements/cpu.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements/cpu.txt
	# torchrec's metadata asks for the CUDA fbgemm-gpu; fbgemm-gpu-cpu above provides its kernels.
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PIP) install -q --no-deps -e .
	$(PY) -c "import torch, fbgemm_gpu, torchrec, torchx, faiss, pyarrow"
	touch $@

demo: setup
	test -d $(DEMO_DIR)/world || $(VENV)/bin/derl generate --out $(DEMO_DIR)/world --preset demo --seed 0
	$(VENV)/bin/derl inspect $(DEMO_DIR)/world

test: setup
	$(PY) -m pytest -q -x

bench: setup
	$(PY) -m derl.benchmarks.datapipe_bench --out benchmarks/results/local
	$(PY) -m derl.benchmarks.upstream_bench --out benchmarks/results/local

clean:
	rm -rf $(VENV) work
