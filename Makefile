# The two commands a fresh clone needs (see README):
#   make demo   - quick bench: MicroAdam vs AdamW vs Adafactor on a byte-level LM, from
#                 scratch and fine-tuned from a pretrained model (the main job)
#   make test   - the full check CI runs: lint, format check, the whole test suite
#   make test-fast - lint and the tests not marked slow (about a minute less)
#
# Torch: if the virtual environment already has torch, it is kept. Otherwise
# $(TORCH_SPEC) is installed; the default pin resolves to a local CPU wheel on
# machines that carry one. Pick your own build with, for example,
#   make TORCH_SPEC="torch==2.5.1" TORCH_PIP_ARGS="--index-url <your torch index>" test
# or by installing torch into .venv yourself before running make.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= all
BIN := $(VENV)/bin

LINTED := src tests examples benchmarks

.PHONY: install demo test test-fast lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/microadam demo

test: lint
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
