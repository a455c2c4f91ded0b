# firehose-zmq: `make run` starts a local cluster, `make test` runs every test,
# `make bench` measures it beside Nchan, in memory and on Redis (BENCH_QUICK=1 for a
# short smoke run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install run test bench bench-scale clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Every setting comes from the environment too: FIREHOSE_PORT_BASE=8000 make run moves
# every port (HTTP 8000, native 8001-8002, admin 8003-8005, workers 8007-8010);
# FIREHOSE_<SECTION>_<KEY> sets one key; `.venv/bin/firehose-cluster --print-config` lists them.
# EDGES=2 make run serves with two edges sharing the HTTP port (EDGES=$$(nproc): one per
# core); one is the default because on two cores a second edge measured more CPU per
# operation and no more throughput (README, Benchmark).
EDGES ?= 1
run: install
	$(VENV)/bin/firehose-cluster --edges $(EDGES)

test: install
	$(PY) -m pytest -q

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Options via the environment: BENCH_QUICK=1, BENCH_REPEATS, BENCH_DURATION,
# BENCH_ONLY (regex on scenario keys), BENCH_SERVERS, BENCH_OUT, BENCH_DURABILITY,
# BENCH_COMMIT_WINDOW_MS, BENCH_EDGES (firehose-cluster --edges);
# see bench/run.py.
bench: $(BENCH_STAMP)
	$(PY) bench/run.py

# The scale row: 1, 2 and 4 workers x 1 and 2 edges (bench/scale.py; about 10 min).
bench-scale: $(BENCH_STAMP)
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
