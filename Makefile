# edgeslim: two commands on a fresh machine, `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := compress,edge,models,dev
# a second, small environment with only the edge extra: proves the node needs no torch
EDGE_VENV := .venv-edge
EDGE_STAMP := $(EDGE_VENV)/.installed

.PHONY: demo test test-edge lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

$(EDGE_STAMP): pyproject.toml
	@test -x $(EDGE_VENV)/bin/python || $(PYTHON) -m venv $(EDGE_VENV)
	$(EDGE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(EDGE_VENV)/bin/python -m pip install --quiet -e ".[edge]"
	@touch $(EDGE_STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgeslim demo

test: $(STAMP) $(EDGE_STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	$(MAKE) --no-print-directory test-edge
	$(PY) -m pytest -q

test-edge: $(STAMP) $(EDGE_STAMP)
	@mkdir -p build
	$(PY) -c "from tests.edge._bundles import linear_bundle; linear_bundle('build/edge-smoke.eslim')"
	cd build && ../$(EDGE_VENV)/bin/python ../tests/edge/torchless_smoke.py edge-smoke.eslim

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples

clean:
	rm -rf $(VENV) $(EDGE_VENV) build *.egg-info src/*.egg-info .pytest_cache
