# The two commands a fresh clone needs (see README):
#   make demo   - quick bench: MicroAdam vs AdamW vs Adafactor on a byte-level LM, from
#                 scratch and fine-tuned from a pretrained model (the main job)
#   make test   - the full check CI runs: lint, format check, the whole test suite
#   make test-fast - lint and the tests not marked slow (about 4 of the 6 minutes)
#   make test-floor - the tests not marked slow under the oldest torch pyproject.toml allows
#                 (FLOOR_TORCH), in a venv of its own (FLOOR_VENV). It DOWNLOADS torch:
#                 PyPI's Linux wheels are CUDA builds, about 0.8 GB plus 2-3 GB of nvidia-*
#                 packages (TORCH_PIP_ARGS="--index-url <a CPU index>" for a small one).
#                 CI does not run it. See docs/setup.md, "Choosing your torch".
#
# Torch: if the virtual environment already has torch, it is kept. Otherwise
# $(TORCH_SPEC) is installed; the default pin resolves to a local CPU wheel on
# machines that carry one. Pick your own build with, for example,
#   make TORCH_SPEC="torch==2.6.0" TORCH_PIP_ARGS="--index-url <your torch index>" test
# or by installing torch into .venv yourself before running make.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= all
BIN := $(VENV)/bin
# Keep FLOOR_TORCH at the floor of pyproject.toml (tests/test_torch_floor.py checks it).
FLOOR_TORCH ?= 2.6.0
FLOOR_VENV ?= build/floor-venv

LINTED := src tests examples benchmarks

.PHONY: install demo test test-fast test-floor lint clean

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

# The CUDA wheels of old torch releases pin an old triton (3.2 for torch 2.6) whose
# interpreter cannot run the Triton kernel: triton is removed, so its tests skip.
test-floor:
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install $(TORCH_PIP_ARGS) "torch==$(FLOOR_TORCH)"
	$(FLOOR_VENV)/bin/python -m pip install -e ".[test,plot]"
	$(FLOOR_VENV)/bin/python -m pip uninstall -y triton
	$(FLOOR_VENV)/bin/python -c "import torch; assert torch.__version__.startswith('$(FLOOR_TORCH)'), torch.__version__"
	$(FLOOR_VENV)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
