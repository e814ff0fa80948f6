# Everything installs itself: a fresh machine needs only Python >= 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: help demo test lint bench soak clean

help:
	@echo "make demo   run the forwarder on embedded NATS servers (ARGS=\"--messages 20000\")"
	@echo "make test   install test extras and run lint, type checks and the whole test suite"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "asset-forwarder needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per install flavour; a change to pyproject.toml reinstalls.
$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[demo]'
	@touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@ $(VENV)/.demo

demo: $(VENV)/.demo
	$(BIN)/forwarder demo $(ARGS)

test: $(VENV)/.test
	$(BIN)/ruff check forwarder tests
	$(BIN)/ruff format --check forwarder tests
	$(BIN)/mypy forwarder
	$(BIN)/pytest $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist *.egg-info
