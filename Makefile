# OsteoGate: `make run` installs the serving environment and serves on embedded defaults;
# `make test` adds the training/test extras and runs the test suite.
#
# One virtual environment (.venv), two levels:
#   make run  -> `pip install .`                  serving only: ONNX Runtime, no torch (~0.5 GB)
#   make test -> `pip install -e '.[train,dev]'`  + torch, training, test tools (editable)
# Run any command with ARGS, e.g. `make run ARGS="--to PACS@pacs:104"` or
# `make osteogate ARGS="studies"`, or call .venv/bin/osteogate directly.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP  := $(VENV)/.installed-test
# What the serving install is built from: a change in any of these reinstalls it.
SOURCES := pyproject.toml $(shell find gateway model training sample_dicom -type f \
             -not -path '*/__pycache__/*' -not -name '*.pyc' 2>/dev/null)
# `make run` listens on loopback only: a first try accepts any caller and has no destination, so
# it must not be reachable from the network. BIND=0.0.0.0 (or a --config whose dicom.bind
# says otherwise) opens it up.
BIND ?= 127.0.0.1
RUN_BIND := $(if $(findstring --config,$(ARGS))$(findstring --bind,$(ARGS))$(OSTEOGATE_CONFIG),,--bind $(BIND))

.PHONY: run test test-long lint lint-imports install install-serve clean demo samples osteogate

# pip runs --quiet (its output is pages of progress); one line per step says what the wait is for.
$(VENV)/bin/python:
	@echo "make: creating the virtual environment $(VENV) ..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Serving install: not editable (no build warnings, nothing read from the checkout at run time).
# A development environment (make test: editable, with torch) already serves the working tree.
$(SERVE_STAMP): $(SOURCES) | $(VENV)/bin/python
	@if [ -f $(TEST_STAMP) ] && [ $(TEST_STAMP) -nt pyproject.toml ]; then :; else \
	  echo "make: installing the serving environment into $(VENV) (about a minute, once) ..."; \
	  rm -rf build && $(PY) -m pip install --quiet . && rm -rf build; fi
	@touch $@
	@echo "make: serving environment ready"

# Development install: editable, so tests run the working tree. torch/torchvision are pinned to
# the releases on this platform's disk (see README). setuptools announces every editable install
# with an information-only "Editable installation" warning (the package-dir mapping needs its
# import finder); we asked for exactly that, so that one message is filtered, nothing else.
$(TEST_STAMP): pyproject.toml | $(VENV)/bin/python
	@echo "make: installing torch into $(VENV) (a few minutes, once) ..."
	$(PY) -m pip install --quiet 'torch==2.14.1' 'torchvision==0.29.1'
	@echo "make: installing OsteoGate with the training and test extras (editable) ..."
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -e '.[train,dev]'
	touch $@

install-serve: $(SERVE_STAMP)

install: $(TEST_STAMP)

run: $(SERVE_STAMP)
	@echo "make: starting osteogate serve (Ctrl-C stops it) ..."
	$(VENV)/bin/osteogate serve $(RUN_BIND) $(ARGS)

osteogate: $(SERVE_STAMP)
	$(VENV)/bin/osteogate $(ARGS)

demo: $(SERVE_STAMP)
	$(VENV)/bin/osteogate demo $(ARGS)

# The suite runs on TEST_WORKERS pytest-xdist workers (default 3 on CI's 2 cores: most tests wait
# on sockets, subprocesses and fsync, so a third worker fills the idle core time; measured 7:14
# against 8:09 with 2 on the same machine);
# --dist loadfile keeps each test file on one worker, so its module fixtures are built once.
# Session fixtures (PostgreSQL cluster, tiny model) are per worker; servers take free ports and
# tmp_path folders. TEST_WORKERS=0 runs it serially in this process.
TEST_WORKERS ?= 3
XDIST := $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS) --dist loadfile)

test: $(TEST_STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-long: $(TEST_STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check gateway model training tests benchmarks sample_dicom
	$(VENV)/bin/lint-imports

lint-imports: $(TEST_STAMP)
	$(VENV)/bin/lint-imports

samples: $(TEST_STAMP)
	$(PY) sample_dicom/make_samples.py

clean:
	rm -rf var .pytest_cache build
