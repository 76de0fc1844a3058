# embtrain developer commands. `make serve` and `make test` work on a fresh machine: they create .venv and
# install everything from the project's own files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# CPU machines get the CPU wheel of torch (2.13.0); the Docker image installs a CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9400
PYTEST_ARGS ?=

.PHONY: all install serve test test-fast proto proto-check lint-docker check-deploy fuzz bench bench-losses bench-allocator bench-transport bench-load bench-groups bench-replicas demo clean

all: test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[server,pml,dev]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/embtrain-server --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

proto: $(STAMP)
	$(PY) proto/generate.py

proto-check: $(STAMP)
	$(PY) proto/generate.py --check

lint-docker: $(STAMP)
	$(VENV)/bin/hadolint Dockerfile

# promtool (Debian's prometheus package) checks and unit-tests the alert rules; installed when missing.
check-deploy: $(STAMP)
	command -v promtool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) || echo "promtool unavailable: structural rule checks only"
	$(PY) deploy/check.py

test: $(STAMP) proto-check lint-docker check-deploy
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -x $(PYTEST_ARGS)

fuzz: $(STAMP)
	EMBTRAIN_FUZZ_EXAMPLES=5000 $(PY) -m pytest -q tests/test_fuzz.py

bench: bench-losses bench-allocator bench-transport bench-load bench-groups bench-replicas

# Each benchmark writes its JSON under bench/results/ and its tables into bench/README.md.
bench-losses: $(STAMP)
	$(PY) bench/losses.py --out bench/results/losses-cpu.json --markdown bench/results/losses-cpu.md

bench-allocator: $(STAMP)
	$(PY) bench/allocator.py --markdown

bench-transport: $(STAMP)
	$(PY) bench/transport.py --out bench/results/transport-cpu.json --markdown

bench-load: $(STAMP)
	$(PY) bench/load.py --clients 32 --seconds 60 --json bench/results/load-cpu.json --markdown

bench-groups: $(STAMP)
	$(PY) bench/groups.py --out bench/results/groups-cpu.json --markdown

bench-replicas: $(STAMP)
	$(PY) bench/replicas.py --out bench/results/replicas-cpu.json --markdown

demo: $(STAMP)
	$(PY) examples/digits/run_demo.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist *.egg-info
