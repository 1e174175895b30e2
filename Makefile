# `make demo` and `make test` are the two commands a new user runs; each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo quickstart test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

DEMO := runs/demo

# The paper's first two comparisons at a size that takes a few minutes on 2 cores.
demo: $(STAMP)
	$(VENV)/bin/pes compare influence-balancing --seeds 0,1 --out $(DEMO)/influence-balancing --overwrite
	$(VENV)/bin/pes compare toy-regression --seeds 0 --num-steps 1500 --out $(DEMO)/toy-regression --overwrite
	$(VENV)/bin/pes surface toy-regression --resolution 61 --runs $(DEMO)/toy-regression --out $(DEMO)/toy-regression/surface.png
	@echo
	@echo "Plots and tables:"
	@ls -1 $(DEMO)/*/*.png $(DEMO)/*/results.md

quickstart: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses=4

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
