#!/usr/bin/env bash
# Compile every csrc/**/*.cu with nvcc for sm_80 and sm_90a (run by `make test` / `make nvcc-check`).
# The .cu files are plain CUDA C++ (no torch headers), so nvcc alone compiles them. Each file is
# compiled twice per arch: plain, and with the macros torch's CUDAExtension adds (which disable
# the implicit __half / __nv_bfloat16 conversions and operators), so a build against torch
# cannot break where this check passed. ptxas reports registers, spills and shared memory per
# kernel (-Xptxas -v); any spill fails the check. Skipped with a message when nvcc is absent.
# Env: NVCC (default: nvcc on PATH), NVCC_ARCHS (default "sm_80 sm_90a").
set -euo pipefail
shopt -s globstar nullglob
cd "$(dirname "$0")/.."
files=(csrc/**/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "nvcc-check: no .cu files"; exit 0; fi
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null; then echo "nvcc-check: nvcc not found, skipped"; exit 0; fi
archs=${NVCC_ARCHS:-"sm_80 sm_90a"}
torch_defs=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
            -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
for f in "${files[@]}"; do
  for arch in $archs; do
    for variant in plain torch; do
      extra=()
      [ "$variant" = torch ] && extra=("${torch_defs[@]}")
      if ! "$NVCC" -std=c++17 -O3 -arch="$arch" -Icsrc "${extra[@]}" -Werror all-warnings -Xptxas -v \
          -c "$f" -o "$tmp/out.o" 2> "$tmp/ptxas.log"; then
        cat "$tmp/ptxas.log"; echo "nvcc-check: FAILED $f ($arch, $variant)"; status=1
      fi
      if [ "$variant" = plain ]; then  # one resource report per arch: kernel, registers, spills, smem
        python3 - "$arch" "$tmp/ptxas.log" <<'PY'
import re, sys
arch, log = sys.argv[1], open(sys.argv[2]).read()
for name, body in re.findall(r"Compiling entry function '(\S+)'(.*?)(?=Compiling entry function|\Z)", log, re.S):
    kernel = re.search(r"\d+(cov_[a-z]+_kernel)I(\w+?)E", name)
    label = f"{kernel.group(1)}<{kernel.group(2).lstrip('0123456789')}>" if kernel else name[:40]
    regs = re.search(r"Used (\d+) registers", body)
    smem = re.search(r"(\d+) bytes smem", body)
    spill = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", body))
    print(f"  {arch:<7} {label:<32} regs {regs.group(1) if regs else '?':>3}  spill {spill} B  smem {smem.group(1) if smem else 0} B")
PY
      fi
      if grep -Eq "[1-9][0-9]* bytes spill (stores|loads)" "$tmp/ptxas.log"; then
        grep -E "Compiling entry|spill" "$tmp/ptxas.log"; echo "nvcc-check: FAILED $f ($arch, $variant): spills"; status=1
      fi
    done
  done
  [ $status -eq 0 ] && echo "nvcc-check: $f ok ($archs; plain and torch macros)"
done
exit $status
