"""A build that runs where it installs (issue 23): the C++ CPU kernel picks its micro-kernels at
run time (AVX-512, else AVX2/FMA/F16C where the CPU has them, the portable ones elsewhere;
``EVA_CPU_ISA=avx2|generic`` simulates a CPU without AVX-512 or AVX2), and an extension built against another torch is refused with the
reason instead of being loaded (the torch backend keeps working)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eva_kernels.backends import cpp as cpp_leaf

needs_ext = pytest.mark.skipif(not cpp_leaf.HAS_EXTENSION, reason=f"no C++ extension: {cpp_leaf.LOAD_ERROR}")

_RUN_BOTH_WAYS = r"""
import json, torch, eva_kernels
from eva_kernels.testing import cov_update_spec
g = torch.Generator().manual_seed(3)
out = {"isa": eva_kernels.get_backend("cpp").info["cpu_isa"], "err": []}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for n, d in ((300, 50), (64, 24), (7, 97), (40, 96), (530, 160)):
        x = (torch.randn(n, d, generator=g) * 2 + 1).to(dtype)
        mask = torch.rand(n, generator=g) > 0.3
        shift = x[:4].float().mean(0)
        cov, col = torch.zeros(d, d), torch.zeros(d)
        eva_kernels.cov_update(cov, col, x, mask, shift=shift, backend="cpp")
        ref, ref_col = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        cov_update_spec(ref, ref_col, x, mask, shift)
        up = torch.ones(d, d, dtype=torch.bool).triu()
        out["err"].append(float((cov.double() - ref)[up].abs().max() / ref[up].abs().max()))
print(json.dumps(out))
"""


def _run(env_isa):
    import os
    env = dict(os.environ)
    env.pop("EVA_CPU_ISA", None)
    if env_isa:
        env["EVA_CPU_ISA"] = env_isa
    proc = subprocess.run([sys.executable, "-c", _RUN_BOTH_WAYS], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as f:
        line = next((ln for ln in f if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@needs_ext
@pytest.mark.parametrize("cap", ["generic", "avx2", None], ids=["generic", "avx2", "detected"])
def test_each_micro_kernel_family_matches_the_spec(cap):
    """Every family this CPU runs (generic, AVX2 with 24-wide tiles, AVX-512 with 48-wide ones),
    capped by EVA_CPU_ISA as a CPU without the wider one would be, equals the float64 spec."""
    flags = _cpu_flags()
    avx2 = {"avx2", "fma", "f16c"} <= flags
    expected = {"generic": "generic", "avx2": "avx2-fma" if avx2 else "generic",
                None: "avx512" if avx2 and "avx512f" in flags else ("avx2-fma" if avx2 else "generic")}[cap]
    got = _run(cap)
    assert got["isa"] == expected
    assert max(got["err"]) <= 2e-6, got


def test_an_extension_built_for_another_torch_is_refused_with_the_reason():
    assert cpp_leaf.torch_mismatch(None, "2.13.0+cpu") is None
    assert cpp_leaf.torch_mismatch("2.13", "2.13.1+cu130") is None
    msg = cpp_leaf.torch_mismatch("2.11", "2.13.0+cpu")
    assert "built against torch 2.11 but torch 2.13 is running" in msg and "pip install --no-build-isolation" in msg
    code = ("import sys, types, json\n"
            "m = types.ModuleType('eva_kernels._build_info'); m.BUILT_TORCH = '1.0'\n"
            "sys.modules['eva_kernels._build_info'] = m\n"
            "import torch, eva_kernels\n"
            "try:\n"
            "    eva_kernels.resolve_backend('cov_update', 'cpu', 'cpp'); why = None\n"
            "except eva_kernels.BackendUnavailableError as exc:\n"
            "    why = str(exc)\n"
            "n = int(eva_kernels.cov_update(torch.zeros(3, 3), torch.zeros(3), torch.ones(2, 3)))\n"
            "print(json.dumps([eva_kernels.available_backends('cpu'), why, n]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    backends, why, n = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "cpp" not in backends and n == 2
    assert "built against torch 1.0" in why
