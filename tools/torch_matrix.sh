#!/usr/bin/env bash
# Build and test the extension against other torch (and Triton) versions (`make test-torch-matrix`;
# not in CI: each version is a multi-GB download the first time, minutes per version after).
#
# For every version in TORCH_VERSIONS (default "2.4.0 2.11.0 2.13.0 2.14.1": the oldest claimed, the
# GPU machine's, the pinned one and the newest on this machine's disk), in its own venv under
# TORCH_MATRIX_DIR (default /tmp/eva-torch-matrix):
#   1. pip install torch==V (the CUDA wheel where the index has no CPU one: it imports without a
#      GPU) and the test dependencies (NumPy < 2 with Triton < 3.9, whose interpreter needs it);
#   2. copy the tracked sources and build eva_kernels._C there (CUDAExtension when that torch
#      has CUDA and nvcc is present: CUDA_HOME defaults to /usr/local/cuda; when nvcc's CUDA does
#      not match that torch's, the CPU-only extension), never touching this checkout's build;
#   3. run tests/backends and tests/ops (TRITON_INTERPRET=1, EVA_REQUIRE_EXT=1): the op's
#      argument errors in a child process included (the torch 2.11 SIGSEGV report);
#   4. run the Triton compile check with that version's Triton (spills differ by version).
# Prints one line per version and step; exits 1 when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VERSIONS=${TORCH_VERSIONS:-"2.4.0 2.11.0 2.13.0 2.14.1"}
DIR=${TORCH_MATRIX_DIR:-/tmp/eva-torch-matrix}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
summary=()
status=0
for v in $VERSIONS; do
  venv="$DIR/venv-$v" src="$DIR/src-$v" log="$DIR/log-$v"
  mkdir -p "$log"
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv" || { summary+=("$v venv FAILED"); status=1; continue; }
  fi
  if ! "$venv/bin/pip" install -q "torch==$v" numpy pytest hypothesis pybind11 ninja setuptools > "$log/pip.txt" 2>&1; then
    summary+=("$v install FAILED (see $log/pip.txt)"); status=1; continue
  fi
  # Triton < 3.9's interpreter (how these tests run Triton kernels on CPU) needs NumPy < 2: its
  # scalars are size-1 arrays, which NumPy 2 refuses to turn into ints (TypeError in every kernel).
  if ! "$venv/bin/python" -c "import sys, triton; sys.exit(tuple(map(int, triton.__version__.split('.')[:2])) < (3, 9))"; then
    "$venv/bin/pip" install -q "numpy<2" >> "$log/pip.txt" 2>&1
  fi
  versions=$("$venv/bin/python" -c "import torch, triton, numpy; print(f'torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}')" 2>&1 | tail -1)
  rm -rf "$src" && mkdir -p "$src"
  git ls-files | tar -cf - -T - | tar -xf - -C "$src"
  (cd "$src" && CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} EVA_CUDA_ARCHS=${EVA_CUDA_ARCHS:-90a} EVA_CUDA_PTX="" \
     MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/python" setup.py build_ext --inplace > "$log/build.txt" 2>&1)
  if ! ls "$src"/eva_kernels/_C*.so > /dev/null 2>&1; then
    # e.g. a torch built for CUDA 12 with this machine's nvcc 13: the CPU-only extension still tests the op
    (cd "$src" && EVA_FORCE_CPU_EXT=1 "$venv/bin/python" setup.py build_ext --inplace >> "$log/build.txt" 2>&1)
  fi
  if ! ls "$src"/eva_kernels/_C*.so > /dev/null 2>&1; then
    summary+=("$v ($versions): build FAILED (see $log/build.txt)"); status=1; continue
  fi
  kind=$(grep -o "building eva_kernels._C: [^)]*)\?" "$log/build.txt" | tail -1)
  (cd "$src" && EVA_REQUIRE_EXT=1 TRITON_INTERPRET=1 PYTHONPATH="$src" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
     tests/backends tests/ops > "$log/tests.txt" 2>&1)
  tests_rc=$?
  tests=$(tail -1 "$log/tests.txt")
  (cd "$src" && env -u TRITON_INTERPRET TRITON_DEFAULT_FP_FUSION=1 PYTHONPATH="$src" "$venv/bin/python" \
     -m eva_kernels.backends.triton.compile_check > "$log/compile_check.txt" 2>&1)
  cc_rc=$?
  cc=$(grep "compile check:" "$log/compile_check.txt" | tail -1)
  summary+=("$v ($versions; ${kind:-extension built}): tests rc=$tests_rc [$tests]; $cc (rc=$cc_rc)")
  [ $tests_rc -ne 0 ] || [ $cc_rc -ne 0 ] && status=1
done
echo
echo "torch matrix (logs under $DIR/log-<version>):"
for line in "${summary[@]}"; do echo "  $line"; done
exit $status
