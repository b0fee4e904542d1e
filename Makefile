# The two commands a user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_DIR ?= work/demo
# Ranks of each distributed stage: on a 2-core CPU two single-threaded ranks train the upstream
# ~1.5x faster than one rank with two threads (docs/results.md, "Demo pipeline").
NPROC ?= 2

.PHONY: setup redis demo test test-fast lint bench clean

setup: $(VENV)/.derl-installed redis

# derl serve's tests and benchmark start a Redis server of their own (docs/serving.md): from the
# system's packages where there is none (apt-get, as root; the package index is refreshed only
# when the first try fails).
redis:
	@command -v redis-server >/dev/null || apt-get install -y -q redis-server \
		|| (apt-get update -q && apt-get install -y -q redis-server)

$(VENV)/.derl-installed: requirements/cpu.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements/cpu.txt
	# torchrec's metadata asks for the CUDA fbgemm-gpu; fbgemm-gpu-cpu above provides its kernels.
	$(PIP) install -q --no-deps torchrec==1.8.0
	$(PIP) install -q --no-deps -e .
	$(PY) -c "import torch, fbgemm_gpu, torchrec, torchx, faiss, pyarrow"
	touch $@

# The whole stack on the demo world (generate -> upstream -> export -> rankers -> evaluate);
# a re-run skips what is done and continues what was interrupted.
demo: setup
	$(VENV)/bin/derl pipeline --workdir $(DEMO_DIR) --preset demo --nproc $(NPROC)

# Everything (what CI runs): two pytest-xdist workers, a test file each at a time, one thread per
# process (docs/testing.md); test-fast: the unit tier, no subprocesses, no multi-rank runs, no
# pipeline (at most 90 s here), for the inner loop. Both run the linter first.
TEST_WORKERS ?= 2
test: setup lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile

test-fast: setup lint
	$(PY) -m pytest -q -x -m "not slow"

# ruff (pyproject.toml [tool.ruff]): pycodestyle and pyflakes, lines up to 120 characters.
lint: setup
	$(VENV)/bin/ruff check .

# The whole suite (`derl bench`): `make bench` (quick, minutes) or `make bench BENCH_SUITE=full`.
# Results, world and runs in BENCH_DIR; the per-stage harnesses (benchmarks/*_bench.py) also run alone.
BENCH_SUITE ?= quick
BENCH_DIR ?= benchmarks/results/local/$(BENCH_SUITE)
bench: setup
	$(VENV)/bin/derl bench --suite $(BENCH_SUITE) --out $(BENCH_DIR)

clean:
	rm -rf $(VENV) work
