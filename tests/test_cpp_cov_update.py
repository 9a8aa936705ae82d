"""Tests of the C++ backend of cov_update (torch.ops.eva_kernels.cov_update_cpp) on CPU.

Compared against the float64 spec :func:`eva_kernels.reference.cov_update_spec` on the upper
triangle (the strictly lower triangle is unspecified after a call).
"""
from __future__ import annotations

import pytest
import torch

import eva_kernels
from eva_kernels import _backends, reference
from eva_kernels import cpp_backend

pytestmark = [
    pytest.mark.cpp,
    pytest.mark.skipif(not cpp_backend.HAS_EXTENSION,
                       reason=f"C++ extension eva_kernels._C not built: {cpp_backend.why_not('cpu')}"),
]

# relative tolerance (vs max |spec|) of the fp32-accumulated result, per input dtype: the input
# values are exact in fp32, so only fp32 accumulation error remains.
TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _op(cov, colsum, x, mask=None, shift=None):
    return torch.ops.eva_kernels.cov_update_cpp(cov, colsum, x, mask, shift)


def _random_sym(d, gen):
    a = torch.randn(d, d, generator=gen)
    return (a + a.T).contiguous()


def _check(cov, colsum, cov64, colsum64, dtype, what=""):
    tol = TOL[dtype]
    scale = max(cov64.abs().max().item(), 1.0)
    err = (torch.triu(cov.double()) - torch.triu(cov64)).abs().max().item() / scale
    assert err <= tol, f"{what} cov rel err {err:.3g} > {tol}"
    cscale = max(colsum64.abs().max().item(), 1.0)
    cerr = (colsum.double() - colsum64).abs().max().item() / cscale
    assert cerr <= tol * 10, f"{what} colsum rel err {cerr:.3g}"
    assert torch.isfinite(torch.triu(cov)).all()


def _make_mask(kind, n, gen):
    if kind == "none":
        return None
    if kind == "keep_none":
        return torch.zeros(n, dtype=torch.bool)
    if kind == "keep_all":
        return torch.ones(n, dtype=torch.bool)
    return torch.rand(n, generator=gen) < 0.6


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("d", [1, 63, 130, 1000], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("n", [0, 1, 257], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("mask_kind", ["none", "keep_none", "keep_all", "random"])
@pytest.mark.parametrize("with_shift", [False, True], ids=["noshift", "shift"])
def test_matches_spec(dtype, d, n, mask_kind, with_shift):
    if d == 1000 and n == 257 and mask_kind in ("keep_all", "keep_none"):
        pytest.skip("covered by the 'none' / 'random' cases at this size (keeps CI lean)")
    gen = torch.Generator().manual_seed(1000 * d + n)
    x = (torch.randn(n, d, generator=gen) * 3 + 0.5).to(dtype)
    mask = _make_mask(mask_kind, n, gen)
    shift = torch.randn(d, generator=gen) if with_shift else None
    cov0 = _random_sym(d, gen)
    colsum0 = torch.randn(d, generator=gen)
    cov, colsum = cov0.clone(), colsum0.clone()
    cov64, colsum64 = cov0.double(), colsum0.double()
    count = _op(cov, colsum, x, mask, shift)
    expect = reference.cov_update_spec(cov64, colsum64, x, mask, shift)
    assert count.dtype == torch.int64 and count.dim() == 0 and count.device == x.device
    assert int(count) == expect
    _check(cov, colsum, cov64, colsum64, dtype, f"{dtype} n={n} d={d} {mask_kind}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_dropped_rows_do_not_leak(dtype, poison):
    gen = torch.Generator().manual_seed(7)
    n, d = 300, 130
    x = torch.randn(n, d, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.5
    x[~mask] = poison
    x = x.to(dtype)
    cov, colsum = torch.zeros(d, d), torch.zeros(d)
    count = _op(cov, colsum, x, mask)
    cov64, colsum64 = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    expect = reference.cov_update_spec(cov64, colsum64, x, mask)
    assert int(count) == expect
    assert torch.isfinite(torch.triu(cov)).all() and torch.isfinite(colsum).all()
    _check(cov, colsum, cov64, colsum64, dtype)


def _strided(kind, n, d, dtype, gen):
    if kind == "col_slice":     # columns 5 : 5 + d of a wider row-major tensor
        return torch.randn(n, d + 11, generator=gen).to(dtype)[:, 5:5 + d]
    if kind == "col_stride2":   # non-unit column stride
        return torch.randn(n, 2 * d, generator=gen).to(dtype)[:, ::2]
    if kind == "every_other_row":
        return torch.randn(2 * n, d, generator=gen).to(dtype)[::2]
    if kind == "transposed":    # column-major (stride (1, n))
        return torch.randn(d, n, generator=gen).to(dtype).T
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("kind", ["col_slice", "col_stride2", "every_other_row", "transposed"])
@pytest.mark.parametrize("d", [63, 130], ids=lambda d: f"d{d}")
def test_strided_inputs(dtype, kind, d):
    gen = torch.Generator().manual_seed(11)
    n = 257
    x = _strided(kind, n, d, dtype, gen)
    assert x.shape == (n, d) and not x.is_contiguous()
    mask = torch.rand(n, generator=gen) < 0.7
    shift = torch.randn(d, generator=gen)
    cov, colsum = torch.zeros(d, d), torch.zeros(d)
    cov64, colsum64 = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    assert int(_op(cov, colsum, x, mask, shift)) == reference.cov_update_spec(cov64, colsum64, x, mask, shift)
    _check(cov, colsum, cov64, colsum64, dtype, kind)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_accumulates_over_calls(dtype):
    gen = torch.Generator().manual_seed(3)
    d = 130
    cov0 = _random_sym(d, gen)
    colsum0 = torch.randn(d, generator=gen)
    cov, colsum = cov0.clone(), colsum0.clone()
    cov64, colsum64 = cov0.double(), colsum0.double()
    shift = torch.randn(d, generator=gen)
    total = expect = 0
    for step, n in enumerate([257, 0, 1, 100, 513]):
        x = torch.randn(n, d, generator=gen).to(dtype)
        mask = torch.rand(n, generator=gen) < 0.5 if step % 2 else None
        total += int(_op(cov, colsum, x, mask, shift))
        expect += reference.cov_update_spec(cov64, colsum64, x, mask, shift)
    assert total == expect
    _check(cov, colsum, cov64, colsum64, dtype, "accumulated")


def test_large_offset_shift_keeps_precision():
    """Data with a mean of 1e3: shifting by it keeps the fp32 accumulation accurate."""
    gen = torch.Generator().manual_seed(5)
    n, d = 513, 63
    x = torch.randn(n, d, generator=gen) + 1e3
    shift = torch.full((d,), 1e3)
    cov, colsum = torch.zeros(d, d), torch.zeros(d)
    cov64, colsum64 = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    _op(cov, colsum, x, None, shift)
    reference.cov_update_spec(cov64, colsum64, x, None, shift)
    _check(cov, colsum, cov64, colsum64, torch.float32, "offset 1e3")


def test_public_api_backend_cpp():
    gen = torch.Generator().manual_seed(9)
    n, d = 200, 70
    x = torch.randn(n, d, generator=gen).to(torch.bfloat16)
    mask = torch.rand(n, generator=gen) < 0.5
    shift = torch.randn(d, generator=gen)
    cov, colsum = torch.zeros(d, d), torch.zeros(d)
    count = eva_kernels.cov_update(cov, colsum, x, mask, shift=shift, backend="cpp")
    cov64, colsum64 = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    assert int(count) == reference.cov_update_spec(cov64, colsum64, x, mask, shift)
    _check(cov, colsum, cov64, colsum64, torch.bfloat16, "public api")
    assert "cpp" in eva_kernels.available_backends("cpu")
    assert _backends.resolve("cov_update", torch.device("cpu"), "auto") == "cpp"


def test_matches_torch_backend():
    gen = torch.Generator().manual_seed(13)
    n, d = 321, 257
    x = torch.randn(n, d, generator=gen).to(torch.float16)
    mask = torch.rand(n, generator=gen) < 0.8
    c1, s1 = torch.zeros(d, d), torch.zeros(d)
    c2, s2 = torch.zeros(d, d), torch.zeros(d)
    n1 = eva_kernels.cov_update(c1, s1, x, mask, backend="cpp")
    n2 = eva_kernels.cov_update(c2, s2, x, mask, backend="torch")
    assert int(n1) == int(n2)
    torch.testing.assert_close(torch.triu(c1), torch.triu(c2), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_opcheck(with_mask):
    gen = torch.Generator().manual_seed(17)
    n, d = 37, 29
    x = torch.randn(n, d, generator=gen).to(torch.bfloat16)
    mask = (torch.rand(n, generator=gen) < 0.5) if with_mask else None
    shift = torch.randn(d, generator=gen)
    args = (torch.zeros(d, d), torch.zeros(d), x, mask, shift)
    torch.library.opcheck(torch.ops.eva_kernels.cov_update_cpp.default, args)


def test_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="cov must be"):
        _op(torch.zeros(3, 4), torch.zeros(3), torch.randn(5, 3))
    with pytest.raises(RuntimeError, match="x must be"):
        _op(torch.zeros(3, 3), torch.zeros(3), torch.randn(5, 3).double())
    with pytest.raises(RuntimeError, match="mask must be"):
        _op(torch.zeros(3, 3), torch.zeros(3), torch.randn(5, 3), torch.ones(4, dtype=torch.bool))


def test_why_not_when_extension_missing(monkeypatch):
    monkeypatch.setattr(cpp_backend, "HAS_EXTENSION", False)
    monkeypatch.setattr(cpp_backend, "LOAD_ERROR", "ImportError: libfoo.so: cannot open shared object")
    msg = cpp_backend.why_not("cpu")
    assert msg is not None
    assert "pip install --no-build-isolation -e ." in msg
    assert "EVA_SKIP_EXT" in msg and "libfoo.so" in msg
    with pytest.raises(eva_kernels.BackendUnavailableError, match="pip install --no-build-isolation"):
        eva_kernels.cov_update(torch.zeros(3, 3), torch.zeros(3), torch.randn(4, 3), backend="cpp")
    # auto falls back to torch
    assert _backends.resolve("cov_update", torch.device("cpu"), "auto") == "torch"


def test_why_not_cuda_reports_build_without_cuda(monkeypatch):
    monkeypatch.setattr(cpp_backend, "HAS_CUDA", False)
    msg = cpp_backend.why_not("cuda")
    assert msg is not None and "pip install --no-build-isolation -e ." in msg
    assert cpp_backend.why_not("cpu") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not cpp_backend.HAS_CUDA, reason="extension built without its CUDA kernel")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("d", [1, 63, 130, 1000], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("n", [0, 1, 257, 5000], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("with_shift", [False, True], ids=["noshift", "shift"])
def test_cuda_matches_spec(dtype, d, n, with_shift):
    gen = torch.Generator().manual_seed(d + n)
    x = torch.randn(n, d, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.6
    x[~mask] = float("nan")
    x = x.to(dtype)
    shift = torch.randn(d, generator=gen) if with_shift else None
    cov0 = _random_sym(d, gen)
    colsum0 = torch.randn(d, generator=gen)
    cov, colsum = cov0.cuda(), colsum0.cuda()
    count = _op(cov, colsum, x.cuda(), mask.cuda(), None if shift is None else shift.cuda())
    cov64, colsum64 = cov0.double(), colsum0.double()
    expect = reference.cov_update_spec(cov64, colsum64, x, mask, shift)
    assert count.device.type == "cuda" and count.dtype == torch.int64
    assert int(count) == expect
    _check(cov.cpu(), colsum.cpu(), cov64, colsum64, dtype, "cuda")
