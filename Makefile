# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch keeps the environment small; any torch>=2.4 works.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint install clean test-composer docs

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[demo,dev]"
	# timm's model_ema.py is a test peer; timm's torchvision does not load beside a CPU
	# torch from PyPI, and model_ema.py needs only torch: install timm without its deps
	$(BIN)/pip install -q --no-deps "timm>=1.0"
	# mmengine's and ultralytics' EMA classes are test peers (tests/test_peers.py); their full
	# dependency trees (OpenCV, torchvision builds) do not install beside a CPU torch
	$(BIN)/pip install -q --no-deps "mmengine>=0.10" "ultralytics>=8.3"
	# mmengine.hooks imports cv2 (its visualization hook); the headless build needs only numpy
	$(BIN)/pip install -q "opencv-python-headless>=4.8"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/emakit demo

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n 2 --doctest-modules src/emakit tests

lint: install
	$(BIN)/ruff check .

# Composer pins an older torch (mosaicml 0.32.1: torch>=2.6,<2.7.1), so its tests run in a
# venv of their own; CI (.ci/run) runs them after `make test`. Building the venv downloads
# ~3 GB (torch 2.7 and its CUDA wheels): 1.5 to 8 minutes on a fresh machine, then the tests
# take under a minute. PIP_CONSTRAINT= lifts a machine-wide torch cap meant for the main venv.
COMPOSER_VENV := .venv-composer
COMPOSER_SPEC ?= mosaicml==0.32.1 torch==2.7.0

$(COMPOSER_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(COMPOSER_VENV)
	PIP_CONSTRAINT= $(COMPOSER_VENV)/bin/pip install -q $(COMPOSER_SPEC) safetensors pytest
	PIP_CONSTRAINT= $(COMPOSER_VENV)/bin/pip install -q --no-deps -e .
	touch $@

test-composer: $(COMPOSER_VENV)/.installed
	$(COMPOSER_VENV)/bin/python -m pytest -q -p no:cacheprovider -o addopts="" tests/composer

# The documentation site (MkDocs + mkdocstrings, versions pinned in the `docs` extra, which
# `dev` includes), built with every warning an error into build/site: a docstring's role that
# names nothing, a link to an object the reference does not render, a page left out of the
# navigation. Offline: nothing is fetched at build time. CI (.ci/run) runs it after `make test`.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) $(COMPOSER_VENV) demo-output build/site
