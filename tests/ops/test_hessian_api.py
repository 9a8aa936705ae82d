"""The op API a quantizer needs, on its own (issue 23): a GPTQ-style Hessian ``H += X^T X``
accumulated with ``cov_update`` (``shift=None``: uncentred), masks for padding, and the full
symmetric matrix from the stored upper triangle (``symmetric_from_upper``), against the float64
``X^T X`` and ``torch.addmm`` on every backend that runs here."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import eva_kernels
from eva_kernels import cov_update, symmetric_from_upper
from helpers import DEVICE, backend_fixture

backend = backend_fixture("cov_update", ("torch", "cpp", "triton"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_hessian_in_a_forward_hook_matches_float64_and_addmm(backend, dtype):
    torch.manual_seed(0)
    d, batches = 37, 3
    layer = nn.Linear(d, 11).to(dtype).to(DEVICE)
    hessian = torch.zeros(d, d, device=DEVICE)
    colsum = torch.zeros(d, device=DEVICE)   # cov_update also sums the columns (unused here)
    seen = []
    mask_of_batch = {}

    def hook(module, args):
        x = args[0].reshape(-1, d)
        mask = mask_of_batch.get("mask")
        cov_update(hessian, colsum, x, mask, backend=backend)  # shift=None: H += X^T X
        seen.append(x.double()[mask] if mask is not None else x.double())

    handle = layer.register_forward_pre_hook(hook)
    try:
        for b in range(batches):
            x = torch.randn(4, 9, d).to(dtype).to(DEVICE)
            mask_of_batch["mask"] = (torch.rand(36) > 0.25).to(DEVICE) if b == 1 else None  # padding dropped
            layer(x)
    finally:
        handle.remove()
    rows = torch.cat(seen).cpu()
    exact = rows.T @ rows
    full = symmetric_from_upper(hessian).double().cpu()
    assert torch.equal(full, full.T)
    assert float((full - exact).abs().max() / exact.abs().max()) <= 1e-6
    ref = torch.zeros(d, d, dtype=torch.float32).addmm_(rows.float().T, rows.float())
    assert float((full - ref.double()).abs().max() / exact.abs().max()) <= 2e-6


def test_symmetric_from_upper_reads_only_the_upper_triangle():
    a = torch.randn(6, 6)
    a_lower_garbage = a.triu() + torch.full((6, 6), float("nan")).tril(-1)
    full = symmetric_from_upper(a_lower_garbage)
    lower = torch.ones(6, 6, dtype=torch.bool).tril(-1)
    assert torch.equal(full, a.triu() + a.triu(1).T) and torch.isnan(a_lower_garbage[lower]).all()
    with pytest.raises(ValueError, match="square"):
        symmetric_from_upper(torch.zeros(3, 4))
    assert eva_kernels.symmetrize_(a_lower_garbage.clone()).equal(full)
