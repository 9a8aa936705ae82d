#!/usr/bin/env bash
# A wheel that runs where it installs (`make test-wheel`; not in CI: a fresh venv and a build,
# about 3 minutes):
#   1. `pip wheel .` with this checkout's interpreter and torch (no build isolation), portable by
#      default (no -march=native: the AVX2 kernels are chosen at run time);
#   2. the wheel's metadata pins torch to the major.minor it was built against;
#   3. a fresh venv (WHEEL_CHECK_DIR, default /tmp/eva-wheel-check) gets torch==2.13.0 from this
#      machine's disk, the test tools and the wheel, nothing from this checkout;
#   4. the op and C++ tests run there from a copy of tests/ (outside the source tree, so the
#      installed package is what they import), once as detected and once with EVA_CPU_ISA=generic
#      (a CPU without AVX2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DIR=${WHEEL_CHECK_DIR:-/tmp/eva-wheel-check}
rm -rf "$DIR"
mkdir -p "$DIR/dist"
echo "[wheel-check] building the wheel with $PY"
EVA_REQUIRE_EXT=1 "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$DIR/dist" . > "$DIR/build.log" 2>&1 \
  || { tail -30 "$DIR/build.log"; exit 1; }
WHEEL=$(ls "$DIR"/dist/eva_kernels-*.whl)
echo "[wheel-check] built $(basename "$WHEEL")"
requires=$(unzip -p "$WHEEL" '*.dist-info/METADATA' | grep '^Requires-Dist: torch' | head -1)
echo "[wheel-check] $requires"
case "$requires" in *"torch=="*) ;; *) echo "[wheel-check] FAIL: the wheel does not pin its torch"; exit 1 ;; esac
python3 -m venv "$DIR/venv"
"$DIR/venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0 numpy pytest hypothesis "$WHEEL" \
  > "$DIR/pip.log" 2>&1 || { tail -30 "$DIR/pip.log"; exit 1; }
cp -r tests "$DIR/tests"
cp pyproject.toml "$DIR/"  # the pytest settings (markers); the package comes from the wheel
cd "$DIR"
TESTS="tests/ops/test_cov_update.py tests/ops/test_hessian_api.py tests/backends/test_cpp_backend.py tests/backends/test_cpp_portable.py"
"$DIR/venv/bin/python" -c "import eva_kernels, sys; print('[wheel-check] imported', eva_kernels.__file__, 'backends', eva_kernels.available_backends('cpu'), 'isa', eva_kernels.get_backend('cpp').info['cpu_isa'])"
EVA_REQUIRE_EXT=1 "$DIR/venv/bin/python" -m pytest -q -p no:cacheprovider $TESTS
EVA_CPU_ISA=generic EVA_REQUIRE_EXT=1 "$DIR/venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/ops/test_cov_update.py -k "cpp"
echo "[wheel-check] ok"
