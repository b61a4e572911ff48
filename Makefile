# Two commands do all the setup: `make bench` and `make test`.
# Every pip call passes the constraints file (torch==2.13.0, the local CPU build).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export MPLBACKEND := Agg

.PHONY: bench test lint clean install

install: $(STAMP)

# The stamp is written last, so an interrupted install is redone.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -f $(STAMP)
	$(PIP) install -c constraints.txt "torch==2.13.0"
	$(PIP) install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/torchsven bench --quick

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
