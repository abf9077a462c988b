# Set-up and everyday commands. Every target installs what it needs first and
# is quick when nothing changed (stamps under .make/, remade only when their
# inputs change). Run as root: CRIU needs it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMPS := .make
CRIU   := /usr/local/sbin/criu
PYCRIU := /usr/local/share/criu/pycriu-src
LAB_PORT ?= 8888

# The venv's node and jlpm come first (Debian 12's Node.js is too old for the builder).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

LABEXT_SOURCES := labextension/package.json labextension/yarn.lock labextension/tsconfig.json \
	$(wildcard labextension/src/*) $(wildcard labextension/schema/*) $(wildcard labextension/style/*)

# Runs a command with its output kept in a log, shown only if it fails.
quietly = log=$(STAMPS)/last-build.log; mkdir -p $(STAMPS); ( $(1) ) >$$log 2>&1 || { cat $$log; echo "failed: $(1)" >&2; exit 1; }

.PHONY: all setup system criu labextension test test-quick mutation lint lab helper bench soak clean FORCE

all: setup

setup: system criu $(STAMPS)/venv $(STAMPS)/labextension

system: $(STAMPS)/system
$(STAMPS)/system: scripts/install-system.sh
	./scripts/install-system.sh
	@mkdir -p $(STAMPS) && touch $@

# CRIU built from Debian's source package; redone when the script changes or
# the binary is gone.
criu: $(STAMPS)/criu
$(STAMPS)/criu: scripts/install-criu.sh scripts/debian-mirror.sh $(wildcard patches/criu/*.patch) $(STAMPS)/system $(if $(wildcard $(CRIU) $(PYCRIU)/pycriu/version.py),,FORCE)
	./scripts/install-criu.sh
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/venv: pyproject.toml $(STAMPS)/criu
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q -e '.[test,lab,dev]'
	# pycriu comes from the same CRIU build as the criu binary, not from PyPI.
	$(PY) -m pip install -q --no-build-isolation --no-deps --force-reinstall $(PYCRIU)
	$(PY) -c "import jupyter_ckpt, pycriu; print('venv ready: pycriu', pycriu.__version__)"
	@mkdir -p $(STAMPS) && touch $@

# The JupyterLab extension, built into the package and linked into the venv.
labextension: $(STAMPS)/labextension
$(STAMPS)/labextension: $(LABEXT_SOURCES) $(STAMPS)/venv
	@$(call quietly,cd labextension && jlpm install --immutable)
	@$(call quietly,cd labextension && jlpm build:prod)
	@$(call quietly,$(VENV)/bin/jupyter-builder develop --overwrite .)
	@$(VENV)/bin/jupyter labextension list 2>&1 | grep -q 'jupyter-ckpt.*enabled' && echo "labextension ready"
	@mkdir -p $(STAMPS) && touch $@

# The proxy JupyterHub needs (configurable-http-proxy, npm), for the JupyterHub test.
$(STAMPS)/hub-proxy: tests/hub/package.json tests/hub/package-lock.json $(STAMPS)/venv
	@$(call quietly,cd tests/hub && npm ci --no-audit --no-fund)
	@mkdir -p $(STAMPS) && touch $@

# jupyter-collaboration's server extension, beside the venv (not enabled in it),
# for the test of the live shared document.
$(STAMPS)/collaboration: tests/collaboration/requirements.txt $(STAMPS)/venv
	@$(call quietly,$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/collaboration -r tests/collaboration/requirements.txt)
	@mkdir -p $(STAMPS) && touch $@

# The privileged helper for servers that are not root (README: Deploying for
# many users), in the foreground, on its default socket.
helper: setup
	$(VENV)/bin/jupyter-ckpt-helper

# Python (ruff) and TypeScript (eslint, prettier) style checks.
lint: $(STAMPS)/venv $(STAMPS)/labextension
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	cd labextension && jlpm lint:check

# The whole suite. scripts/check-skips.py fails the run when a test that CI
# can run was skipped.
test: setup lint $(STAMPS)/hub-proxy $(STAMPS)/collaboration
	cd labextension && jlpm test --silent
	$(PY) -m pytest -p no:cacheprovider -q -rs --durations=25 --junitxml=test-artifacts/junit.xml
	$(PY) scripts/check-skips.py test-artifacts/junit.xml

# Mutation testing (mutmut) of the modules that hold the logic against their
# unit tests (pyproject.toml's [tool.mutmut]): the score per module, the
# survivors in test-artifacts/. Fails under 80 %. Not part of make test.
mutation: $(STAMPS)/venv
	$(PY) scripts/mutation.py

# What needs neither CRIU nor a browser: a minute or less.
test-quick: $(STAMPS)/venv
	$(PY) -m pytest -p no:cacheprovider -q -m "not criu and not browser and not slow"

# JupyterLab with jupyter_ckpt and the demo notebook, snapshots in the default
# local store (<jupyter data dir>/ckpt).
lab: setup
	cd notebooks && ../$(VENV)/bin/jupyter lab --allow-root --no-browser \
		--ip=127.0.0.1 --port=$(LAB_PORT) demo.ipynb

# The benchmark suite against raw CRIU, dill and Kishu: a table, and the
# figures as JSON in test-artifacts/bench.json. QUICK=1: one small workload.
bench: setup $(STAMPS)/bench
	$(PY) benchmarks/suite.py $(if $(QUICK),--quick) --json test-artifacts/bench.json
$(STAMPS)/bench: pyproject.toml $(STAMPS)/venv
	$(PY) -m pip install -q -e '.[test,lab,dev,bench]'
	@touch $@

# Leaks over many cycles (snapshot, change, restore, fork, shut the fork down):
# the server's fds, memory, processes, namespaces, tables, mounts and files,
# before and after. Not part of `make test`: about 15 minutes.
soak: setup
	$(PY) benchmarks/soak.py --cycles $(or $(CYCLES),200) --json test-artifacts/soak.json

FORCE:

clean:
	rm -rf $(STAMPS) $(VENV) mutants build dist *.egg-info jupyter_ckpt/labextension labextension/node_modules labextension/lib
