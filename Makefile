# `make demo` and `make test` are the two commands a new user runs; each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo quickstart test test-slow test-all test-lowest docs lint clean

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

# The fast suite: every test not marked slow (the slow ones are end-to-end runs, multi-process
# runs, benchmarks' quick modes, the crash and fuzz tests; `make test-slow` runs them, CI runs both).
PYTEST := $(PY) -m pytest -q -n auto --maxprocesses=4
test: $(STAMP)
	$(PYTEST) -m "not slow" --durations=25

test-slow: $(STAMP)
	$(PYTEST) -m slow

test-all: $(STAMP)
	$(PYTEST)

# The lowest versions pyproject's bounds allow for every direct dependency (uv's lowest-direct
# resolution; what they pull in is resolved as usual) in a venv of their own, then the fast tests.
LOWEST_VENV ?= .venv-lowest
LOWEST_PYTEST_ARGS ?= -n auto --maxprocesses=4
test-lowest:
	test -x $(LOWEST_VENV)/bin/python || $(PYTHON) -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -m pip install --quiet uv
	$(LOWEST_VENV)/bin/python -m uv pip install --quiet --python $(LOWEST_VENV)/bin/python \
		--resolution lowest-direct -e '.[test]'
	$(LOWEST_VENV)/bin/python -m uv pip list --python $(LOWEST_VENV)/bin/python \
		| grep -iE '^(jax|jaxlib|numpy|ml.dtypes|optax|typer|tqdm|matplotlib|orbax-checkpoint|pyyaml|mujoco|gymnasium|flax|equinox|diffrax) '
	$(LOWEST_VENV)/bin/python -m pytest -q -rs -m "not slow" $(LOWEST_PYTEST_ARGS)

# The documentation site (mkdocs-material, API pages from the docstrings, the command-line
# reference rendered from the app) into site/; any warning (a broken link or reference) fails.
docs: $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	$(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(LOWEST_VENV) build dist site *.egg-info
