# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs the project, runs the quickstart pipeline end to end
#   make test   creates .venv, installs the project with test extras, runs the test suite
# The project needs Python 3.11 (pyproject.toml); another one stops here with one line, and a .venv
# made by another Python is rebuilt on the next run.
PY_WANT := 3.11
PYTHON ?= $(shell command -v python$(PY_WANT) || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PY_VERSION = import sys; print("%d.%d" % sys.version_info[:2])

.PHONY: demo test bench install constraints clean

# Checked when the Makefile is read, so a wrong Python gives exactly one line and nothing is built.
ifneq ($(filter-out clean,$(or $(MAKECMDGOALS),demo)),)
PY_FOUND := $(shell "$(PYTHON)" -c '$(PY_VERSION)' 2>/dev/null)
ifneq ($(PY_FOUND),$(PY_WANT))
$(error steel needs Python $(PY_WANT), but PYTHON=$(PYTHON) is $(or $(PY_FOUND),not runnable): install python$(PY_WANT) or run `make $(or $(MAKECMDGOALS),demo) PYTHON=/path/to/python$(PY_WANT)`)
endif
endif

# The stamp holds the venv's Python version: a venv made by another Python is removed and rebuilt.
$(STAMP): pyproject.toml constraints.txt
	@if [ -e $(VENV) ] && [ "$$($(BIN)/python -c '$(PY_VERSION)' 2>/dev/null)" != "$(PY_WANT)" ]; then \
	  echo "make: $(VENV) was not made by Python $(PY_WANT); rebuilding it"; rm -rf $(VENV); fi
	test -x $(BIN)/python || "$(PYTHON)" -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -c '$(PY_VERSION)' > $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/steel run --config configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

# Pin what the venv has now (after changing pyproject.toml and `make install`).
constraints: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) runs
