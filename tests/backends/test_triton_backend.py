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


def test_every_variant_keeps_a_config_on_every_checked_target():
    """The compile check's exclusions (spilling configs, pruned at run time) never leave a
    variant without a config, and name only configs that exist."""
    from eva_kernels.backends.triton.launches import EXCLUDED, LAUNCHES, config_label, prune_configs
    labels = {(launch.name, config_label(c)) for launch in LAUNCHES for c in launch.configs}
    assert {(kernel, cfg) for kernel, cfg, _, _ in EXCLUDED} <= labels
    for launch in LAUNCHES:
        for variant in launch.variants:
            for major in (8, 9, 10):
                kept = prune_configs(launch.name, list(launch.configs), variant.label, major)
                assert kept and all(c in launch.configs for c in kept), (launch.name, variant.label, major)
                sm = 90 if major >= 9 else 80
                assert not any((launch.name, config_label(c), variant.label, sm) in EXCLUDED for c in kept)
