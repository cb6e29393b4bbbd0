# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU build of torch keeps the environment small; any torch>=2.4 works.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[demo,dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/emakit demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --doctest-modules src/emakit tests

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) demo-output
