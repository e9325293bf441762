# funcx-endpoint: the two commands are `make demo` and `make test`.
# Each sets up what is missing first (OS packages, a virtualenv, the package).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STATE_DIR ?= $(CURDIR)/.state
# Test processes (trial -j): the suite waits on brokers and daemons as much as it computes.
TEST_JOBS ?= 2

.PHONY: all demo test bench docs lint typecheck clean system system-test deps demo-stop

all: test

system:
	@scripts/bootstrap-system.sh

# The tests also run a private PostgreSQL server (the service's second backend)
# a private Slurm cluster (Slurm's daemons and clients, MariaDB for its
# accounting, iproute2 for the nodes' network namespaces), MPICH (real MPI
# across the cluster's two nodes), their own Podman and Docker daemon (workers
# in containers), verify systemd units with systemd-analyze, and drive Debian's
# Chromium headless (the portal's browser test).
system-test:
	@scripts/bootstrap-system.sh postgresql slurm mpi containers systemd browser

$(STAMP): setup.py
	@echo ">>> Creating the virtualenv $(VENV) and installing the package"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=23" "setuptools>=68" wheel
	$(BIN)/pip install -q -e '.[test,parsl,kubernetes]'
	@# Refresh twistd's plugin cache (twisted/plugins/dropin.cache) now rather
	@# than on the first `twistd --help`.
	$(BIN)/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	@touch $(STAMP)

deps: system $(STAMP)

demo: deps
	$(BIN)/python scripts/demo.py --state-dir $(STATE_DIR)/demo

demo-stop:
	$(BIN)/python scripts/demo.py --state-dir $(STATE_DIR)/demo --stop

test: system-test deps
	$(BIN)/trial -j$(TEST_JOBS) tests

bench: deps
	@for b in benchmarks/*/run; do echo ">>> $$b"; $$b || exit 1; done

# Only the figures the issues ask for, one benchmark at a time:
bench-%: deps
	benchmarks/$*/run


docs: deps
	$(BIN)/pip install -q -e '.[docs]'
	$(BIN)/sphinx-build -W -b html docs docs/_build/html

lint: deps
	$(BIN)/pip install -q -e '.[lint]'
	$(BIN)/ruff check funcx_endpoint tests benchmarks scripts twisted

typecheck: deps
	$(BIN)/pip install -q -e '.[lint]'
	$(BIN)/mypy funcx_endpoint

clean:
	-$(BIN)/python scripts/demo.py --state-dir $(STATE_DIR)/demo --stop 2>/dev/null
	rm -rf $(VENV) .tox build dist *.egg-info _trial_temp* docs/_build $(STATE_DIR) twisted/plugins/dropin.cache
	find . -name __pycache__ -prune -exec rm -rf {} +
