"""``cov_update(..., precision="fast")``: shifted 16-bit rows at one product each (issue 22).

On the ``triton`` backend the fast path multiplies the raw 16-bit rows and takes the shift out
per chunk of ``CHUNK_ROWS`` rows; elsewhere ``precision="fast"`` runs the exact path. Checked
against the float64 spec entry by entry with the contract's bound
(``FAST_PRODUCT_ERROR * sum_i (|x_ia x_ib| + |s_a s_b|)`` plus fp32 accumulation), across
chunk sizes (tests lower ``CHUNK_ROWS`` to 32 so that small inputs cross chunk boundaries),
dtypes, odd sizes, masks with NaN rows and strided views; and that the error does grow with
``R = max E[x^2] / max Var`` (:func:`eva_kernels.moment_ratio`), which is why the engine
routes by it.
"""
from __future__ import annotations

import pytest
import torch

import eva_kernels
from eva_kernels import cov_update, moment_ratio
from eva_kernels.ops.cov_update import FAST_PRODUCT_ERROR, fast_error_estimate
from helpers import DEVICE, TRITON_MARKS, backend_fixture

#: each backend that can run cov_update on DEVICE (torch and cpp: precision="fast" is exact there)
backend = backend_fixture("cov_update", ("torch", "cpp", "triton"))

LOWP = {"fp16": torch.float16, "bf16": torch.bfloat16}


def triton_only(test):
    """The Triton marks (interpreter on CPU; skipped where Triton cannot run)."""
    for mark in TRITON_MARKS:
        test = mark(test)
    return test


@pytest.fixture(params=[32, 512], ids=["chunk32", "chunk512"])
def chunk(request, monkeypatch):
    """The fast path's rows per chunk (the triton kernel reads it at each call)."""
    try:
        from eva_kernels.backends.triton import cov_update_kernel
    except ImportError:
        return request.param
    monkeypatch.setattr(cov_update_kernel, "CHUNK_ROWS", request.param)
    return request.param


def _data(n, d, dtype, seed, offset=2.0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    spread = torch.exp(0.5 * torch.randn(d, generator=g))

    def base(rows, cols):
        return (torch.randn(rows, cols, generator=g) * 3 + offset).to(dtype).to(DEVICE)
    x = {"contiguous": lambda: base(n, d), "transposed": lambda: base(d, n).t(),
         "col_slice": lambda: base(n, d + 7)[:, 3:3 + d]}[layout]()
    return x * spread.to(dtype).to(DEVICE)


def _fast_and_reference(backend, x, mask, shift):
    """(cov upper triangle after a fast update of zeros, float64 spec, entrywise bound)."""
    d = x.shape[1]
    cov, col = torch.zeros(d, d, device=DEVICE), torch.zeros(d, device=DEVICE)
    count = cov_update(cov, col, x, mask, shift=shift, backend=backend, precision="fast")
    keep = torch.ones(x.shape[0], dtype=torch.bool) if mask is None else mask.cpu()
    xk = x.cpu()[keep].double()
    y = xk - shift.cpu().double()
    assert int(count) == int(keep.sum())
    ref = y.T @ y
    s = shift.cpu().double().abs()
    c = xk.shape[0]
    bound = (FAST_PRODUCT_ERROR * (xk.abs().T @ xk.abs() + c * torch.outer(s, s))
             + c * 2.0 ** -23 * (y.abs().T @ y.abs()) + 1e-30)
    torch.testing.assert_close(col.cpu().double(), y.sum(0), rtol=0, atol=1e-5 * float(y.abs().sum(0).max()) + 1e-30)
    return torch.triu(cov.cpu().double()), torch.triu(ref), torch.triu(bound)


@pytest.mark.parametrize("dtype", list(LOWP.values()), ids=list(LOWP))
@pytest.mark.parametrize("n,d", [(1, 1), (257, 63), (100, 130), (700, 5)], ids=str)
@pytest.mark.parametrize("mask_kind", [None, "random_nan"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "col_slice"])
def test_fast_matches_spec_within_the_contract(backend, chunk, dtype, n, d, mask_kind, layout):
    x = _data(n, d, dtype, seed=n + d, layout=layout)
    mask = None
    if mask_kind:
        mask = (torch.rand(n, generator=torch.Generator().manual_seed(7)) < 0.7).to(DEVICE)
        if layout == "contiguous":
            x[~mask] = float("nan")  # dropped rows may hold NaN: never read into the sums
    shift = x[:8].float().nan_to_num().mean(0).contiguous()
    got, ref, bound = _fast_and_reference(backend, x, mask, shift)
    assert torch.isfinite(got).all()
    err = (got - ref).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float(err.max()) <= 1e-4 * max(float(ref.abs().max()), 1e-30)


@triton_only
def test_fast_crosses_chunks_and_splits_of_n(chunk):
    """n >> d: many chunks and (triton) several programs along n; kept rows spread unevenly."""
    n, d = 1500, 9
    x = _data(n, d, torch.bfloat16, seed=3)
    mask = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    mask[100:900] = True
    mask[1400:] = True
    got, ref, bound = _fast_and_reference("triton", x, mask, x[:64].float().mean(0).contiguous())
    assert bool(((got - ref).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-noshift"])
def test_fast_is_the_exact_path_where_it_does_not_apply(backend, dtype):
    """fp32 input, or 16-bit input without a shift: ``precision="fast"`` gives the very same bits."""
    x = _data(90, 17, dtype, seed=1)
    shift = x[:4].float().mean(0).contiguous() if dtype == torch.float32 else None
    out = []
    for precision in ("exact", "fast"):
        cov, col = torch.zeros(17, 17, device=DEVICE), torch.zeros(17, device=DEVICE)
        cov_update(cov, col, x, None, shift=shift, backend=backend, precision=precision)
        out.append(torch.triu(cov))
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("bad", ["tf32", "", None, "FAST"])
def test_bad_precision_raises_before_writing(backend, bad):
    cov = torch.zeros(4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="precision must be 'exact' or 'fast'"):
        cov_update(cov, torch.zeros(4, device=DEVICE), torch.ones(3, 4, device=DEVICE), backend=backend,
                   precision=bad)
    assert not cov.any()


@triton_only
@pytest.mark.parametrize("dtype", list(LOWP.values()), ids=list(LOWP))
def test_fast_error_grows_with_the_moment_ratio(dtype):
    """Four channels with a mean of +100 spreads (R ~ 1e4, a massive-activation case): the fast
    path's error is many times the exact path's and above 1e-4, yet within
    ``fast_error_estimate(R)``; at R ~ 1 it is far below 1e-4. So R routes the engine."""
    n, d = 2048, 24
    g = torch.Generator().manual_seed(5)
    unit = torch.randn(n, d, generator=g)
    errors = {}
    for offset in (0.0, 100.0):
        x = unit.clone()
        x[:, :4] += offset
        x = x.to(dtype).to(DEVICE)
        shift = x[:512].float().mean(0).contiguous()
        y = x.cpu().double() - shift.cpu().double()
        ref = torch.triu(y.T @ y)
        ratio = float(moment_ratio(torch.diagonal(y.T @ y), y.sum(0), n, shift.cpu()))
        for precision in ("exact", "fast"):
            cov, col = torch.zeros(d, d, device=DEVICE), torch.zeros(d, device=DEVICE)
            cov_update(cov, col, x, None, shift=shift, backend="triton", precision=precision)
            errors[offset, precision] = float((torch.triu(cov.cpu().double()) - ref).abs().max() / ref.abs().max())
        errors[offset, "R"] = ratio
    assert errors[0.0, "R"] < 1.1 and errors[100.0, "R"] > 5e3
    assert errors[0.0, "fast"] < 1e-6
    assert errors[100.0, "exact"] < 1e-4
    assert errors[100.0, "fast"] > 1e-4 and errors[100.0, "fast"] > 30 * errors[100.0, "exact"], errors
    assert errors[100.0, "fast"] <= fast_error_estimate(errors[100.0, "R"]), errors


@triton_only
def test_the_kernel_chunk_is_the_contracts():
    from eva_kernels.backends.triton import cov_update_kernel
    from eva_kernels.ops.cov_update import FAST_CHUNK_ROWS
    assert cov_update_kernel.CHUNK_ROWS == FAST_CHUNK_ROWS
    assert "triton" in eva_kernels.available_backends("cpu") or torch.cuda.is_available()


def test_moment_ratio_matches_float64_moments():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 200, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7) + torch.tensor([0, 0, 5, 0, 0, 40.0])
    shift = x[:, :10].mean(1)
    y = x - shift[:, None]
    got = moment_ratio((y * y).sum(1), y.sum(1), torch.full((3,), 200), shift)
    want = (x * x).mean(1).amax(-1) / x.var(1, unbiased=False).amax(-1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    assert got.shape == (3,)
    one = moment_ratio((y[0] * y[0]).sum(0), y[0].sum(0), 200, shift[0])
    torch.testing.assert_close(one, want[0], rtol=1e-10, atol=0)
    assert moment_ratio(torch.zeros(4), torch.zeros(4), 5, torch.ones(4)).item() == float("inf")
    assert moment_ratio(torch.ones(4) * 5, torch.zeros(4), 5, None).item() == 1.0
