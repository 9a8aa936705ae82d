"""What only the ``triton`` backend has: its mirror kernel, its fp32-only fused product (other
dtypes go through torch), its in-place products for ``topk_eigh`` (fp32 statistics are not
copied per solve), and the reasons it gives when it cannot run.

Accuracy on the common grids is in tests/ops/ (parametrised over every backend).
"""
from __future__ import annotations

import pytest
import torch

import eva_kernels
from eva_kernels.linalg import sym_from_upper
from helpers import DEVICE, TRITON_MARKS, UPPER_BMM_MARKS

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
    from eva_kernels.backends.triton.eigen_steps import symmetrize
    g = torch.Generator().manual_seed(d)
    cov = torch.randn(d, d, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    lower = torch.tril(torch.ones(d, d, dtype=torch.bool, device=DEVICE), -1)
    out = symmetrize(cov.masked_fill(lower, float("nan")))  # the lower triangle is never read
    assert out.dtype == dtype and out.shape == (d, d)
    torch.testing.assert_close(out, sym_from_upper(cov), rtol=0, atol=0)


@UPPER_BMM_MARKS[-1]
@pytest.mark.parametrize("centred", [False, True], ids=["raw", "centred"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mark", TRITON_MARKS[:1])
def test_topk_eigh_products_read_fp32_statistics_in_place(products, dtype, centred, mark):
    """fp32 statistics are not copied per solve (the in-place kernel through a one-entry address
    table); fp64 ones are mirrored. Either way the product ignores the lower triangle."""
    from eva_kernels.backends.triton.upper_bmm import InPlaceOperand
    g = torch.Generator().manual_seed(5)
    d, b = 45, 7
    full = torch.randn(d, d, generator=g, dtype=torch.float64)
    full = full + full.T
    lower = torch.tril(torch.ones(d, d, dtype=torch.bool), -1)
    stored = full.masked_fill(lower, float("nan")).to(dtype).to(DEVICE)
    q = torch.randn(d, b, generator=g, dtype=torch.float64)
    c = torch.randn(d, generator=g, dtype=torch.float64) if centred else None
    n = torch.tensor(9.0, dtype=torch.float64)
    op = products.prepare(stored)
    assert isinstance(op, InPlaceOperand) == (dtype == torch.float32)
    y = products.matmul(op, q.to(dtype).to(DEVICE), None if c is None else c.to(dtype).to(DEVICE),
                        None if c is None else n.to(DEVICE))
    ref = full @ q - (torch.outer(c, c) @ q / n if centred else 0)
    assert (y.double().cpu() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_unavailable_message_is_clear():
    assert triton_leaf.why_not("mps") is not None
    msg = triton_leaf.why_not("cpu")
    if msg is not None:
        from eva_kernels.backends.triton.config import MIN_TRITON, TRITON_VERSION
        assert ("TRITON_INTERPRET=1" in msg) if TRITON_VERSION >= MIN_TRITON else ("older than 3.6" in msg)
    assert eva_kernels.get_backend("triton").priority == {"cuda": 30}  # never auto on CPU


def test_every_variant_keeps_a_config_on_every_checked_target():
    """The compile check's exclusions (spilling configs, pruned at run time), for CI's Triton and
    each other measured Triton, name only configs that exist and never leave a variant without a
    config, except where a Triton spills with all of them (then every config stays: the gap is
    stated here, so that it is seen)."""
    from eva_kernels.backends.triton.launches import (EXCLUDED, EXCLUDED_BY_TRITON, LAUNCHES, config_label,
                                                      prune_configs)
    labels = {(launch.name, config_label(c)) for launch in LAUNCHES for c in launch.configs}
    gaps = set()
    for version, table in [(None, EXCLUDED), *EXCLUDED_BY_TRITON.items()]:
        assert {(kernel, cfg) for kernel, cfg, _, _ in table} <= labels, version
        for launch in LAUNCHES:
            for variant in launch.variants:
                for major in (8, 9, 10):
                    sm = 90 if major >= 9 else 80
                    excluded = [c for c in launch.configs if (launch.name, config_label(c), variant.label, sm) in table]
                    if len(excluded) == len(launch.configs):
                        gaps.add((version, launch.name, variant.label, sm))
                        continue
                    kept = prune_configs(launch.name, list(launch.configs), variant.label, major,
                                         version or (99, 0))
                    if version is None:  # a version without a table of its own uses EXCLUDED
                        assert kept == [c for c in launch.configs if c not in excluded]
    # Triton 3.6 (the GPU machine's): every fp32 shifted config spills on sm_80
    assert gaps == {((3, 6), "_cov_update_kernel", "fp32-shift-strided", 80)}, gaps


def test_wide_tiles_kept_for_row_major_16bit_input_on_sm90():
    """The autotuner keeps the 128-wide 8-warp configs for a row-major 16-bit launch on sm_90
    (with CI's Triton and the GPU machine's 3.6), and prunes them for a strided view of the same
    rows, where they spill (the compile check's tables)."""
    from eva_kernels.backends.triton.cov_update_kernel import GPU_CONFIGS
    from eva_kernels.backends.triton.launches import (is_contiguous_launch, is_wide, prune_configs,
                                                      variant_of_cov_update)
    x = torch.empty(64, 576, dtype=torch.bfloat16)
    assert is_contiguous_launch(x) and not is_contiguous_launch(x[:, :570]) and not is_contiguous_launch(x[:, ::2])
    for version in (None, (3, 6)):
        for shift, fast in ((False, False), (True, True), (True, False)):
            row_major = prune_configs("_cov_update_kernel", GPU_CONFIGS,
                                      variant_of_cov_update(x.dtype, shift, fast, False), 9, version)
            strided = prune_configs("_cov_update_kernel", GPU_CONFIGS,
                                    variant_of_cov_update(x.dtype, shift, fast, True), 9, version)
            assert any(is_wide(c) for c in row_major), (version, shift, fast)
            assert strided and not any(is_wide(c) for c in strided), (version, shift, fast)


def _bf16_split_product(x: torch.Tensor, mask, shift: torch.Tensor) -> torch.Tensor:
    """float64 value of the split path's three products: y = fp32(x) - shift (kept rows),
    hi = rn_bf16(y), lo = rn_bf16(y - hi), hi^T hi + hi^T lo + lo^T hi."""
    y = x.float() if mask is None else x.float()[mask]
    y = y - shift
    hi = y.bfloat16().float()
    lo = (y - hi).bfloat16().float()
    hi, lo = hi.double(), lo.double()
    return hi.mT @ hi + hi.mT @ lo + lo.mT @ hi


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("masked", [False, True], ids=["all-rows", "masked"])
@pytest.mark.parametrize("mark", TRITON_MARKS[:1])
def test_shifted_16bit_input_takes_the_bf16_split(dtype, masked, mark):
    """Shifted 16-bit input is multiplied as the bf16 hi/lo split: the kernel equals the split's
    three products to fp32 accumulation error (the parts are rounded to nearest even, as torch
    rounds), and the float64 spec to the 16-bit tolerance."""
    from eva_kernels.testing import assert_close, cov_update_spec
    if triton_leaf.why_not(torch.device(DEVICE).type) is not None:
        pytest.skip(triton_leaf.why_not(torch.device(DEVICE).type))
    g = torch.Generator().manual_seed(5)
    n, d = 203, 70
    x = (torch.randn(n, d, generator=g) * 2 + 3).to(dtype)
    mask = (torch.rand(n, generator=g) > 0.4) if masked else None
    shift = x[:5].float().mean(0) + 0.01 * torch.randn(d, generator=g)  # not representable in 16 bits
    cov, colsum = torch.zeros(d, d, device=DEVICE), torch.zeros(d, device=DEVICE)
    eva_kernels.cov_update(cov, colsum, x.to(DEVICE), mask=None if mask is None else mask.to(DEVICE),
                           shift=shift.to(DEVICE), backend="triton")
    upper = torch.triu(torch.ones(d, d, dtype=torch.bool))
    split = _bf16_split_product(x, mask, shift)
    assert_close(cov.cpu()[upper], split[upper], rtol=2e-6, atol_scale=2e-7, msg="split products")
    spec_cov, spec_sum = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    cov_update_spec(spec_cov, spec_sum, x, mask, shift)
    assert_close(cov.cpu()[upper], spec_cov[upper], rtol=1e-4, atol_scale=1e-5, msg="float64 spec")
    assert_close(colsum.cpu(), spec_sum, rtol=1e-5, atol_scale=1e-6, msg="column sums (exact fp32 y)")
    # the split is what ran: it differs from the exact product by more than fp32 rounding
    assert float((split - spec_cov)[upper].abs().max()) > 0


def test_compile_check_reports_the_tensor_core_shapes():
    """The compile check names the MMA instruction shape of every case (a regression to narrow
    wgmma tiles on sm_90 shows in CI's report)."""
    from eva_kernels.backends.triton.compile_check import _mma_shapes
    sm90 = ("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};\n"
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};")
    assert _mma_shapes(sm90) == "wgmma m64n64k16,m64n128k16"
    assert _mma_shapes("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {...};") == "mma m16n8k8"
    assert _mma_shapes("fma.rn.f32 %f1, %f2, %f3, %f4;") == "-"


def test_too_old_triton_is_refused_with_the_fix(monkeypatch):
    """Triton older than the oldest tested (torch 2.4 ships 3.0, which cannot build the kernels):
    the backend says so and names the fix, ``auto`` passes it over, and the named alternatives run."""
    from eva_kernels.backends.triton import config as triton_config
    monkeypatch.setattr(triton_config, "TRITON_VERSION", (3, 0))
    msg = triton_leaf.why_not("cuda")
    assert "older than 3.6" in msg and "pip install 'triton>=3.6'" in msg and "backend='cpp' or 'torch'" in msg
    with pytest.raises(eva_kernels.BackendUnavailableError, match="older than 3.6"):
        eva_kernels.cov_update(torch.zeros(3, 3), torch.zeros(3), torch.randn(4, 3), backend="triton")
    assert eva_kernels.resolve_backend("cov_update", "cpu", "auto").name != "triton"
    cov, colsum = torch.zeros(3, 3), torch.zeros(3)
    x = torch.randn(4, 3)
    assert int(eva_kernels.cov_update(cov, colsum, x, backend="torch")) == 4  # the fix the message names
    torch.testing.assert_close(torch.triu(cov), torch.triu(x.T @ x))
