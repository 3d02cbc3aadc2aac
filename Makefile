# Quick start on a fresh machine:
#   make run    install everything, then start a 3-node cluster with its router on :8080
#   make test   install everything, then run the whole test suite
SHELL := /bin/bash
# The virtualenv's interpreter: the distribution's CPython 3.11+ when it can make a venv
# (Debian's and Ubuntu's are built with profile-guided optimisation; a plain source build,
# such as pyenv's default, ran the node's Python about 15 % slower here: docs/performance.md,
# "Which CPython"), else the first python3 on PATH. `make PYTHON=...` picks another.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
PY_STAMP := $(VENV)/.installed
NPM_STAMP := node_modules/.installed
NODES ?= 3
PORT ?= 8080
# three workers on two cores: most tests wait on real nodes (the suite keeps a 2-core machine
# about half busy with two), and every test has its own ports and data directory
PYTEST_WORKERS ?= 3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install run test lint bench system-deps clean

install: $(PY_STAMP) $(NPM_STAMP)

$(PY_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# Debian packages the tests and the benchmark need: Chromium (browser tests, driven by
# Playwright against /usr/bin/chromium; never a downloaded browser), redis-server (the
# Redis-adapter peer of the benchmark) and gcc (the benchmark's compiled load generator,
# bench/cloadgen, built from source at bench time).
system-deps:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v cc >/dev/null || missing="$$missing gcc"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

run: install
	$(BIN)/shardchat up --nodes $(NODES) --port $(PORT)

lint: install
	$(BIN)/ruff check .

test: install system-deps lint
	$(BIN)/pytest -n $(PYTEST_WORKERS) --timeout 180 -q

bench: install system-deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) node_modules .shardchat .pytest_cache .ruff_cache
