"""The public cov_update (torch backend) against the float64 spec; dispatch and validation."""
from __future__ import annotations

import pytest
import torch

import eva_kernels
from eva_kernels import BackendUnavailableError, cov_update
from eva_kernels.reference import cov_update_spec

TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}  # inputs exact in fp32 after widening
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _x(n, d, dtype, seed=0, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return (torch.randn(n, d, generator=g) * 3 + 1).to(dtype)
    if layout == "col_slice":  # rows with a stride larger than d
        return (torch.randn(n, d + 7, generator=g) * 3).to(dtype)[:, 3:3 + d]
    if layout == "transposed":  # unit row stride, column stride n
        return (torch.randn(d, n, generator=g) * 3).to(dtype).t()
    if layout == "every_other_row":
        return (torch.randn(2 * n, d, generator=g) * 3).to(dtype)[::2]
    raise ValueError(layout)


def _mask(n, kind, seed=1):
    if kind is None:
        return None
    if kind == "none_kept":
        return torch.zeros(n, dtype=torch.bool)
    if kind == "all_kept":
        return torch.ones(n, dtype=torch.bool)
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) > 0.4


def _start(d, seed=5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g)
    return (a + a.T).contiguous(), torch.randn(d, generator=g)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("n,d", [(0, 5), (1, 1), (257, 63), (100, 130)], ids=lambda v: str(v))
@pytest.mark.parametrize("mask_kind", [None, "none_kept", "all_kept", "random"])
@pytest.mark.parametrize("layout", ["contiguous", "col_slice", "transposed", "every_other_row"])
@pytest.mark.parametrize("with_shift", [False, True], ids=["noshift", "shift"])
def test_cov_update_torch_matches_float64(dtype, n, d, mask_kind, layout, with_shift):
    x = _x(n, d, dtype, layout=layout)
    mask = _mask(n, mask_kind)
    shift = torch.linspace(-1, 1, d) if with_shift else None
    cov0, col0 = _start(d)
    cov, col = cov0.clone(), col0.clone()
    ref_cov, ref_col = cov0.double(), col0.double()
    count = cov_update(cov, col, x, mask, shift=shift, backend="torch")
    expected = cov_update_spec(ref_cov, ref_col, x, mask, shift)
    assert count.dtype == torch.int64 and count.dim() == 0 and count.device == x.device
    assert int(count) == expected
    scale = max(1.0, ref_cov.abs().max().item())
    iu = torch.triu_indices(d, d)
    err = (cov.double()[iu[0], iu[1]] - ref_cov[iu[0], iu[1]]).abs().max().item() / scale
    assert err <= TOL[dtype]
    torch.testing.assert_close(col.double(), ref_col, rtol=1e-5, atol=1e-4 * max(1.0, n))


def test_accumulates_over_calls_and_ignores_nan_in_dropped_rows():
    d = 37
    cov, col = torch.zeros(d, d), torch.zeros(d)
    ref_cov, ref_col = torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    total = 0
    for i in range(4):
        x = _x(50 + i, d, torch.bfloat16, seed=i)
        mask = _mask(50 + i, "random", seed=i)
        x[~mask] = float("nan")
        x[~mask & (torch.arange(50 + i) % 2 == 0)] = float("inf")
        total += int(cov_update(cov, col, x, mask, backend="torch"))
        cov_update_spec(ref_cov, ref_col, x, mask)
    assert torch.isfinite(cov).all() and torch.isfinite(col).all()
    torch.testing.assert_close(cov.double(), ref_cov, rtol=1e-5, atol=1e-3)
    assert total == int(sum((_mask(50 + i, "random", seed=i)).sum() for i in range(4)))


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.zeros(3, 4, 5)), "2-D"),
    (dict(x=torch.zeros(3, 4, dtype=torch.int32)), "float32, float16 or bfloat16"),
    (dict(cov=torch.zeros(4, 4, dtype=torch.float64)), "cov must be float32"),
    (dict(cov=torch.zeros(5, 5)), r"\(4, 4\)"),
    (dict(cov=torch.zeros(4, 8)[:, ::2]), "contiguous"),
    (dict(colsum=torch.zeros(5)), "colsum"),
    (dict(mask=torch.ones(3, dtype=torch.int64)), "mask must be a bool"),
    (dict(mask=torch.ones(2, dtype=torch.bool)), "mask must be a bool"),
    (dict(shift=torch.zeros(4, dtype=torch.float16)), "shift"),
    (dict(cov=torch.zeros(4, 4, device="meta")), "meta"),
], ids=["3d", "int", "cov64", "covshape", "covstride", "colsum", "maskdtype", "masklen", "shiftdtype", "device"])
def test_bad_arguments_raise_before_writing(bad, match):
    args = dict(cov=torch.zeros(4, 4), colsum=torch.zeros(4), x=torch.ones(3, 4), mask=None, shift=None)
    args.update(bad)
    before = args["cov"].clone() if args["cov"].device.type != "meta" else None
    with pytest.raises((ValueError, TypeError), match=match):
        cov_update(args["cov"], args["colsum"], args["x"], args["mask"], shift=args["shift"], backend="torch")
    if before is not None:
        assert torch.equal(args["cov"], before)


def test_backend_selection(monkeypatch):
    assert "torch" in eva_kernels.available_backends("cpu")
    with pytest.raises(ValueError, match="not a backend"):
        cov_update(torch.zeros(2, 2), torch.zeros(2), torch.ones(1, 2), backend="cuda-magic")
    monkeypatch.setenv("EVA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="EVA_BACKEND"):
        cov_update(torch.zeros(2, 2), torch.zeros(2), torch.ones(1, 2))
    monkeypatch.setenv("EVA_BACKEND", "torch")
    assert int(cov_update(torch.zeros(2, 2), torch.zeros(2), torch.ones(3, 2))) == 3


def test_unavailable_backend_names_the_fix(monkeypatch):
    from eva_kernels import _backends
    monkeypatch.setattr(_backends, "_OPS", {k: type(v)(v.name, {n: i for n, i in v.impls.items() if n == "torch"})
                                            for k, v in _backends._OPS.items()})
    with pytest.raises(BackendUnavailableError, match="pip install --no-build-isolation -e ."):
        cov_update(torch.zeros(2, 2), torch.zeros(2), torch.ones(1, 2), backend="cpp")
    assert _backends.resolve("cov_update", torch.device("cpu"), "auto") == "torch"


def test_custom_op_opcheck_and_compile():
    d = 6
    args = (torch.zeros(d, d), torch.zeros(d), torch.randn(9, d), torch.rand(9) > 0.5, torch.randn(d), "torch")
    torch.library.opcheck(torch.ops.eva_kernels.cov_update.default, args)

    def f(cov, col, x, m):
        return torch.ops.eva_kernels.cov_update(cov, col, x, m, None, "torch")

    cov, col = torch.zeros(d, d), torch.zeros(d)
    x, m = torch.randn(9, d), torch.ones(9, dtype=torch.bool)
    out = torch.compile(f, backend="eager", fullgraph=True)(cov, col, x, m)
    assert int(out) == 9
    torch.testing.assert_close(cov, x.T @ x, rtol=1e-5, atol=1e-5)
