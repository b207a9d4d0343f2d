# OsteoGate: `make run` installs and serves on embedded defaults; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-long lint install clean demo samples

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision are pinned to the releases on this platform's disk (see README).
	$(PY) -m pip install --quiet 'torch==2.14.1' 'torchvision==0.29.1'
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/osteogate serve $(ARGS)

demo: $(STAMP)
	$(VENV)/bin/osteogate demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-long: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway model training tests benchmarks sample_dicom

samples: $(STAMP)
	$(PY) sample_dicom/make_samples.py

clean:
	rm -rf var .pytest_cache
