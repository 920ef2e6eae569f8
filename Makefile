# The two commands of the README: `make demo` and `make test`. Each creates the local
# virtual environment .venv on first use (torch pinned to the CPU build on disk).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DOCS_STAMP := $(VENV)/.docs-stamp
TORCH := torch==2.13.0

.PHONY: demo test lint bench docs wheel-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits_stiefel.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks

# The documentation site (mkdocs, API reference from the docstrings) into site/;
# --strict: a warning (broken link, docstring that does not parse) fails the build.
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

# The wheel as a user gets it: `pip wheel . --no-deps`, its contents (py.typed, LICENSE,
# no tests or benchmarks), installed with only torch and numpy into a throwaway venv, a
# few optimizer steps there (.ci/wheel_check.py).
wheel-check: $(STAMP)
	$(PY) .ci/wheel_check.py

clean:
	rm -rf $(VENV)
