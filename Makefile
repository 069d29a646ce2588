# Every target sets itself up on first use: a venv in .venv with the CPU build of torch installed first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
THREADS := OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 MKL_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false

.PHONY: setup run test test-slow lint bench bench-results gpu-check tables notebook clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)  ## the default experiment: full cache, stories260k, TinyStories perplexity
	$(THREADS) $(BIN)/python run.py $(ARGS)

test: $(STAMP)  ## the default suite (CPU, under 15 minutes on 2 cores)
	$(THREADS) TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(ARGS)

test-slow: $(STAMP)  ## slow tests: experiment scale=cpu variants, long equivalence sweeps
	$(THREADS) TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -m slow $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check kvx scripts tests run.py

bench: $(STAMP)  ## speed and memory per method (default grid) into outputs/bench/; ARGS="bench=scale": 1k..16k tokens
	$(THREADS) $(BIN)/python scripts/bench.py $(ARGS)

bench-results: $(STAMP)  ## the three grids into results/bench/ (the committed tables)
	$(THREADS) $(BIN)/python scripts/bench.py out=results/bench $(ARGS)
	$(THREADS) $(BIN)/python scripts/bench.py bench=scale out=results/bench $(ARGS)
	$(THREADS) $(BIN)/python scripts/bench.py bench=scale_b8 out=results/bench $(ARGS)

gpu-check: $(STAMP)  ## on a GPU machine: Triton kernels natively against their twins, the CUDA grid, decode bandwidth
	bash scripts/gpu_check.sh $(ARGS)

tables: $(STAMP)
	$(THREADS) $(BIN)/python scripts/aggregate.py $(ARGS)

notebook: $(STAMP)  ## run notebooks/analysis.ipynb headless; the executed copy, plots included: outputs/analysis.ipynb
	mkdir -p outputs
	$(THREADS) $(BIN)/jupyter-execute notebooks/analysis.ipynb --output=../outputs/analysis --timeout=600

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
