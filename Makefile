# Two entry points, each doing its own set-up in a virtual environment (.venv):
#   make train   trains a small DiT-MoE on the embedded digits (CPU is enough)
#   make test    runs the test suite (Triton kernels through the interpreter on CPU), then
#                builds the C++ sampler with CMake and runs its ctest (skipped without cmake/c++)
#   make lint    ruff check and ruff format --check (the rules are in pyproject.toml)
# If the Python you run this with already has torch (say a CUDA build), the venv sees and keeps
# it; otherwise $(TORCH) is installed, the CPU build by default here.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# pytest workers (pytest-xdist): most tests are single-threaded interpreter runs.
JOBS ?= 2

.PHONY: train test lint bench clean

$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[dev,hf]"
	touch $@

train: $(VENV)/.installed
	$(BIN)/python -m dit.train $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n $(JOBS) --benchmark-disable --durations=25 $(ARGS)
	@tests/cpp/build_and_run.sh "$(abspath $(BIN))/python"

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.installed
	$(BIN)/python -m pytest benchmarks/ --benchmark-only $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks build
