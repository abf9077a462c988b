# Set-up and everyday commands. Every target installs what it needs first and
# is quick when nothing changed (stamps under .make/). Run as root: CRIU needs it.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMPS := .make
PYCRIU := /usr/local/share/criu/pycriu-src
LAB_PORT ?= 8888

# The venv's node and jlpm come first (Debian 12's Node.js is too old for the builder).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

LABEXT_SOURCES := labextension/package.json labextension/yarn.lock labextension/tsconfig.json \
	$(wildcard labextension/src/*) $(wildcard labextension/schema/*) $(wildcard labextension/style/*)

.PHONY: all setup system criu labextension test lab bench clean

all: setup

setup: system criu $(STAMPS)/venv $(STAMPS)/labextension

system: $(STAMPS)/system
$(STAMPS)/system: scripts/install-system.sh
	./scripts/install-system.sh
	@mkdir -p $(STAMPS) && touch $@

# Builds CRIU from Debian's source package unless a good one is installed
# (the script checks in well under a second).
criu: $(STAMPS)/system
	./scripts/install-criu.sh

$(STAMPS)/venv: pyproject.toml $(PYCRIU)/pycriu/version.py | criu
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
	cd labextension && jlpm install --immutable >/dev/null
	cd labextension && jlpm build:prod >/dev/null
	$(VENV)/bin/jupyter-builder develop --overwrite . >/dev/null 2>&1
	@$(VENV)/bin/jupyter labextension list 2>&1 | grep -q 'jupyter-ckpt.*enabled' && echo "labextension ready"
	@mkdir -p $(STAMPS) && touch $@

test: setup
	cd labextension && jlpm test --silent
	$(PY) -m pytest -p no:cacheprovider -q

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

clean:
	rm -rf $(STAMPS) $(VENV) build dist *.egg-info jupyter_ckpt/labextension labextension/node_modules labextension/lib
