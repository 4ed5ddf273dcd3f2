# One target per habit. Every target creates or reuses the virtualenv in .venv.
# torch is pinned to 2.13.0 (a CPU wheel on these machines); everything else is
# installed under constraints.txt so that no dependency can pull another torch.
# pip installs without byte-compiling, then compileall compiles on every core at once
# (pip compiles file by file; back to back here: 174 s that way, 114 s this way).
# The .pyc files must exist: with PYTHONDONTWRITEBYTECODE set, Python would otherwise
# compile torch at every start. Files that do not compile are skipped, as pip skips them.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
TEST_WORKERS ?= 2
HETEROFL_DATA_DIR ?= $(abspath ../shared/datasets/mnist)
export HETEROFL_DATA_DIR

.PHONY: install web browser demo test test-all test-web test-fast check bench clean

$(BIN)/heterofl-edge: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile torch==2.13.0
	$(BIN)/pip install --quiet --no-compile -c constraints.txt -e '.[server,executorch,dev]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	touch $@

install: $(BIN)/heterofl-edge

## The main job on embedded defaults: coordinator + 6 devices (levels a, c, e) on MNIST.
demo: install
	$(BIN)/heterofl-edge demo --out runs/demo

## The browser device client: npm packages pinned by web/package-lock.json (no install
## scripts run), then the page and onnxruntime-web's wasm runtime copied to
## coordinator/static/device/ (git-ignored), where the coordinator serves them.
web: web/node_modules/.package-lock.json
	cd web && npm run build --silent

web/node_modules/.package-lock.json: web/package.json web/package-lock.json
	cd web && npm ci --ignore-scripts --no-audit --no-fund

## Debian's chromium for the browser tests (Playwright drives it; nothing is downloaded
## by Playwright itself). Installed with apt-get when missing and run as root.
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: sudo apt-get install chromium (browser tests will skip)"; fi; }

## The browser client's unit tests (node's test runner).
test-web: web
	cd web && npm test

## All tests, the real-MNIST ones and the browser client's included.
test: install web browser
	cd web && npm test
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal --durations=20 -m "not heavy"

## Everything, the heavy exports (minutes each) included.
test-all: install web browser
	cd web && npm test
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

## Tests without the slow (training) ones.
test-fast: install
	$(BIN)/python -m pytest -m "not slow"

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: install
	$(BIN)/python bench/bench_simulate.py
	$(BIN)/python bench/bench_round_floor.py
	$(BIN)/python bench/bench_export.py
	if command -v perf >/dev/null; then $(BIN)/python bench/profile_executorch.py; \
	else echo "bench: profile_executorch.py skipped: needs perf (apt-get install linux-perf)"; fi
	$(BIN)/python bench/bench_coordinator.py
	$(BIN)/python bench/bench_fleet.py
	$(BIN)/python bench/bench_load.py
	$(BIN)/python bench/bench_browser.py
	$(BIN)/python bench/bench_transformer.py --modes a,b,c,d,e,a-e
	$(BIN)/python bench/bench_secagg.py
	$(BIN)/python bench/bench_secagg_http.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache .import_linter_cache web/node_modules coordinator/static/device
