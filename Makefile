# `make demo` and `make test` each create .venv and install the package first: the demo only
# the package and its dependencies, the tests also the test extras (tensorflow-datasets, ...).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install clean

$(BIN)/.installed-demo: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(BIN)/.installed: pyproject.toml $(BIN)/.installed-demo
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed-demo
	$(BIN)/python experiments/lmt.py --flagfile=experiments/configs/lmt_digits.flags --workdir=runs/lmt_digits

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
