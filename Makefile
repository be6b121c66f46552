# cctr — every target installs into .venv first if needed.
PY := .venv/bin/python
STAMP := .venv/.installed-stamp

.PHONY: install test test-all demo bench ui reproduce-table1

DATASET ?= phantom-cardiac
PRESET ?= quick
SEEDS ?=
JOBS ?=
PORT ?= 5000

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,distributed]'
	touch $(STAMP)

# the suite runs on one worker process per core (at most 4): most tests are single-threaded by design
# (tests/conftest.py), so one process left the second core of a 2-core machine idle (11:20 vs 8:04)
XDIST := -n auto --maxprocesses=4

test: install
	$(PY) -m pytest -q $(XDIST)

test-all: install
	$(PY) -m pytest -q $(XDIST) -m ''

demo: install
	$(PY) -m cctr.demo

bench: install
	.venv/bin/cctr bench

ui: install
	.venv/bin/cctr ui --port $(PORT)

reproduce-table1: install
	.venv/bin/cctr table1 --dataset $(DATASET) --preset $(PRESET) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(JOBS),--jobs $(JOBS))
