"""What only the ``triton`` backend has: its mirror kernel, its fp32-only fused product (other
dtypes go through torch), and the reasons it gives when it cannot run.

Accuracy on the common grids is in tests/ops/ (parametrised over every backend).
"""
from __future__ import annotations

import pytest
import torch

import eva_kernels
from eva_kernels.linalg import sym_from_upper
from helpers import DEVICE, TRITON_MARKS

triton_leaf = pytest.importorskip("eva_kernels.backends.triton")


@pytest.fixture(scope="module")
def products():
    reason = triton_leaf.why_not(torch.device(DEVICE).type)
    if reason is not None:
        pytest.skip(reason)
    return eva_kernels.get_backend("triton").topk_eigh


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("d", [1, 37, 70], ids=lambda v: f"d{v}")
@pytest.mark.parametrize("mark", TRITON_MARKS[:1])
def test_mirror_kernel_is_exact(products, d, dtype, mark):
    g = torch.Generator().manual_seed(d)
    cov = torch.randn(d, d, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    lower = torch.tril(torch.ones(d, d, dtype=torch.bool, device=DEVICE), -1)
    out = products.prepare(cov.masked_fill(lower, float("nan")))  # the lower triangle is never read
    assert out.dtype == dtype and out.shape == (d, d)
    torch.testing.assert_close(out, sym_from_upper(cov), rtol=0, atol=0)


def test_unavailable_message_is_clear():
    assert triton_leaf.why_not("mps") is not None
    msg = triton_leaf.why_not("cpu")
    if msg is not None:
        assert "TRITON_INTERPRET=1" in msg
    assert eva_kernels.get_backend("triton").priority == {"cuda": 30}  # never auto on CPU
