"""What only the ``cpp`` backend has: large-d panel paths and threads of the CPU kernel, the
C++ argument checks of the dispatcher op, and the reasons it gives when it cannot run.

Accuracy on the common grid (dtypes, masks, strides, shifts) is in tests/ops/test_cov_update.py.
"""
from __future__ import annotations

import pytest
import torch

import eva_kernels
from eva_kernels.backends import cpp as cpp_leaf
from eva_kernels.testing import cov_update_spec

pytestmark = [
    pytest.mark.cpp,
    pytest.mark.skipif(not cpp_leaf.HAS_EXTENSION,
                       reason=f"C++ extension eva_kernels._C not built: {cpp_leaf.why_not('cpu')}"),
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _op(cov, colsum, x, mask=None, shift=None):
    return torch.ops.eva_kernels.cov_update(cov, colsum, x, mask, shift)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("n", [1, 257, 1100], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_large_d_uses_every_panel(dtype, n, with_mask):
    """d = 1000 spans several packed panels and row blocks (EVA_CPP_KC rows per panel), on all
    of torch's threads (this module keeps the default thread count)."""
    gen = torch.Generator().manual_seed(n)
    d = 1000
    x = (torch.randn(n, d, generator=gen) * 3 + 0.5).to(dtype)
    mask = torch.rand(n, generator=gen) < 0.6 if with_mask else None
    shift = torch.randn(d, generator=gen)
    cov, colsum = torch.zeros(d, d), torch.zeros(d)
    cov64, colsum64 = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    assert int(_op(cov, colsum, x, mask, shift)) == cov_update_spec(cov64, colsum64, x, mask, shift)
    scale = cov64.abs().max().item()
    assert (torch.triu(cov.double()) - torch.triu(cov64)).abs().max().item() <= 2e-5 * scale
    torch.testing.assert_close(colsum.double(), colsum64, rtol=1e-4, atol=1e-4 * colsum64.abs().max().item())


_CPP_CHECKS = """
import torch, eva_kernels
cases = [((torch.zeros(3, 4), torch.zeros(3), torch.randn(5, 3)), "cov must be"),
         ((torch.zeros(3, 3), torch.zeros(3), torch.randn(5, 3).double()), "x must be"),
         ((torch.zeros(3, 3), torch.zeros(3), torch.randn(5, 3), torch.ones(4, dtype=torch.bool)), "mask must be")]
for args, match in cases:
    args = args + (None,) * (5 - len(args))
    try:
        torch.ops.eva_kernels.cov_update(*args)
    except RuntimeError as exc:
        assert match in str(exc), (match, str(exc))
    else:
        raise AssertionError(f"no error for {match!r}")
print("checked")
"""


def test_op_checks_its_arguments_in_cpp():
    """The compiled kernel checks what it is handed even when called without the Python wrapper.

    In a child process: on the first GPU run (torch 2.11+cu130, CUDAExtension build) a failing
    TORCH_CHECK crashed the interpreter with SIGSEGV, which took the whole pytest session down
    with it; here a crash fails this test alone and names the signal."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _CPP_CHECKS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "checked" in proc.stdout, (
        f"exit {proc.returncode} (negative: killed by that signal)\n{proc.stdout}\n{proc.stderr[-3000:]}")


def test_auto_picks_cpp_on_cpu_for_cov_update_only():
    assert eva_kernels.resolve_backend("cov_update", "cpu", "auto").name == "cpp"
    assert not eva_kernels.get_backend("cpp").implements("topk_eigh")
    assert eva_kernels.get_backend("cpp").info["cpu_isa"]


def test_why_not_when_extension_missing(monkeypatch):
    monkeypatch.setattr(cpp_leaf, "HAS_EXTENSION", False)
    monkeypatch.setattr(cpp_leaf, "LOAD_ERROR", "ImportError: libfoo.so: cannot open shared object")
    msg = cpp_leaf.why_not("cpu")
    assert msg is not None
    assert "pip install --no-build-isolation -e ." in msg
    assert "EVA_SKIP_EXT" in msg and "libfoo.so" in msg
    with pytest.raises(eva_kernels.BackendUnavailableError, match="pip install --no-build-isolation"):
        eva_kernels.cov_update(torch.zeros(3, 3), torch.zeros(3), torch.randn(4, 3), backend="cpp")
    assert eva_kernels.resolve_backend("cov_update", "cpu", "auto").name == "torch"  # auto chooses


def test_why_not_cuda_reports_build_without_cuda(monkeypatch):
    monkeypatch.setattr(cpp_leaf, "HAS_CUDA", False)
    msg = cpp_leaf.why_not("cuda")
    assert msg is not None and "pip install --no-build-isolation -e ." in msg
    assert cpp_leaf.why_not("cpu") is None
