"""``cov_update`` on every backend available here against the float64 spec.

Each test is parametrised over the backends (``torch``, ``cpp``, ``triton``; an unavailable one
is skipped with its reason) and runs on ``helpers.DEVICE`` (CUDA when present, else CPU, where
Triton runs only under ``TRITON_INTERPRET=1``). Only the upper triangle of ``cov`` is compared:
the strictly lower one is unspecified after a call. Sizes are not multiples of any block size.
Backend-specific paths (C++ panels and threads, Triton's split-n and autotuning) are in
tests/backends/.
"""
from __future__ import annotations

import pytest
import torch

import eva_kernels
from eva_kernels import cov_update
from eva_kernels.testing import cov_update_spec
from helpers import DEVICE, backend_fixture

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# max |cov - spec| / max|spec| on the upper triangle. Inputs are exact in fp32 after widening, so
# only the fp32 accumulation error remains, except on tensor cores: tf32x3 for fp32, and the bf16
# split of shifted 16-bit input (SPLIT_PRODUCT_ERROR per product); 1e-4 is the 16-bit contract.
TOL = {"torch": dict.fromkeys(DTYPES.values(), 2e-5),
       "cpp": {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4},
       "triton": {torch.float32: 2e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}}


#: each backend that can run cov_update on DEVICE (skipped with the reason otherwise)
backend = backend_fixture("cov_update", ("torch", "cpp", "triton"))


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _x(n, d, dtype, seed=1, layout="contiguous"):
    """(n, d) activations (mean 0.5, std 3) in ``dtype`` on DEVICE, in one of several layouts.

    The base tensor moves to DEVICE before the view is taken: ``view.to("cuda")`` would copy the
    view into a contiguous tensor, and the GPU runs would test the contiguous layout only."""
    g = _gen(seed)

    def base(*shape):
        return (torch.randn(*shape, generator=g) * 3 + 0.5).to(dtype).to(DEVICE)

    views = {
        "contiguous": lambda: base(n, d),
        "col_slice": lambda: base(n, d + 11)[:, 5:5 + d],         # row stride > d
        "col_stride2": lambda: base(n, 2 * d)[:, ::2],            # non-unit column stride
        "transposed": lambda: base(d, n).t(),                     # unit row stride, column stride n
        "every_other_row": lambda: base(2 * n, d)[::2],
        "offset_view": lambda: base(n + 3, d + 2)[3:, 1:1 + d],   # storage offset, odd strides
    }
    x = views[layout]()
    assert x.device.type == torch.device(DEVICE).type
    assert layout == "contiguous" or min(n, d) <= 1 or not x.is_contiguous(), layout
    return x


def _mask(n, kind, seed=2):
    if kind is None:
        return None
    if kind == "keep_all":
        return torch.ones(n, dtype=torch.bool, device=DEVICE)
    if kind == "keep_none":
        return torch.zeros(n, dtype=torch.bool, device=DEVICE)
    return (torch.rand(n, generator=_gen(seed)) < 0.6).to(DEVICE)


def _run(backend, xs, masks, shift=None, seed=5):
    """cov_update over the batches ``xs`` on a random symmetric start value, and the float64 spec."""
    d = xs[0].shape[1]
    g = _gen(seed)
    a = torch.randn(d, d, generator=g)
    cov0, col0 = (a + a.T).contiguous(), torch.randn(d, generator=g)
    cov, col = cov0.clone().to(DEVICE), col0.clone().to(DEVICE)
    ref, ref_col = cov0.double(), col0.double()
    for x, mask in zip(xs, masks):
        count = cov_update(cov, col, x, mask, shift=shift, backend=backend)
        expected = cov_update_spec(ref, ref_col, x.cpu(), None if mask is None else mask.cpu(),
                                   None if shift is None else shift.cpu())
        assert count.dtype == torch.int64 and count.dim() == 0 and count.device == x.device
        assert int(count) == expected
    return cov.cpu(), col.cpu(), ref, ref_col, cov0


def _rel(a, ref, floor=0.0):
    """max |a - ref| / max(max |ref|, floor)."""
    scale = max(ref.abs().max().item(), floor)
    err = (a.double() - ref).abs().max().item()
    return err / scale if scale > 0 else err


def _check(backend, dtype, xs, masks, shift=None):
    cov, col, ref, ref_col, cov0 = _run(backend, xs, masks, shift)
    tol = TOL[backend][dtype]
    up = torch.triu(torch.ones_like(ref, dtype=torch.bool))
    upd, ref_upd = (cov.double() - cov0.double())[up], (ref - cov0.double())[up]
    if ref_upd.abs().max() > 0:  # the update itself, not dominated by the start value ...
        # (reading it back as cov - cov0 adds one rounding of cov's magnitude: floor the scale)
        assert _rel(upd, ref_upd, floor=4 * 2.0 ** -23 * cov0.abs().max().item() / tol) <= 2 * tol
    else:
        assert upd.abs().max().item() == 0.0  # nothing kept: nothing may change
    assert _rel(cov[up], ref[up]) <= tol  # ... and the accumulated matrix
    assert _rel(col, ref_col) <= max(tol, 1e-5) * 10
    assert torch.isfinite(cov[up]).all() and torch.isfinite(col).all()


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("n,d", [(0, 5), (1, 1), (257, 63), (100, 130)], ids=lambda v: str(v))
@pytest.mark.parametrize("mask_kind", [None, "keep_none", "keep_all", "random"])
@pytest.mark.parametrize("with_shift", [False, True], ids=["noshift", "shift"])
@pytest.mark.parametrize("layout", ["contiguous", "col_slice", "transposed", "every_other_row"])
def test_matches_spec(backend, dtype, n, d, mask_kind, with_shift, layout):
    if backend == "triton" and DEVICE == "cpu" and (layout != "contiguous" or
                                                   (d > 63 and mask_kind in ("keep_none", "keep_all"))):
        pytest.skip("interpreter time: test_strided_x and the 'None'/'random' masks cover this for Triton")
    shift = torch.linspace(-1, 1, d).to(DEVICE) if with_shift else None
    _check(backend, dtype, [_x(n, d, dtype, layout=layout)], [_mask(n, mask_kind)], shift)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("layout", ["col_slice", "col_stride2", "transposed", "every_other_row", "offset_view"])
def test_strided_x(backend, dtype, layout):
    n, d = 67, 45
    x = _x(n, d, dtype, layout=layout)
    assert x.shape == (n, d) and not x.is_contiguous()
    _check(backend, dtype, [x], [_mask(n, "random")], torch.randn(d, generator=_gen(3)).to(DEVICE) * 0.3)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shifted", [False, True], ids=["noshift", "shift"])
def test_dropped_rows_with_nan_inf_do_not_leak(backend, dtype, shifted):
    n, d = 70, 37
    x = _x(n, d, dtype)
    mask = _mask(n, "random")
    x[~mask] = float("nan")
    x[(~mask).nonzero()[::2, 0], 3] = float("inf")
    x[(~mask).nonzero()[1::2, 0], 5] = -float("inf")
    _check(backend, dtype, [x], [mask], torch.randn(d, generator=_gen(4)).to(DEVICE) if shifted else None)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_accumulates_over_calls(backend, dtype):
    sizes = [57, 0, 1, 40, 113]
    xs = [_x(n, 70, dtype, seed=i) for i, n in enumerate(sizes)]
    masks = [_mask(n, "random", seed=i) if i % 2 else None for i, n in enumerate(sizes)]
    _check(backend, dtype, xs, masks, torch.randn(70, generator=_gen(6)).to(DEVICE))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_shift_keeps_large_offsets_accurate(backend, dtype):
    """Channels with a mean ~1e3 x their spread: shifting by the mean keeps fp32 accurate."""
    n, d = 90, 33
    mu = torch.linspace(-1, 1, d) * 1e3
    x = (mu + torch.randn(n, d, generator=_gen(4))).to(dtype).to(DEVICE)
    _check(backend, dtype, [x], [_mask(n, "random")], x[:8].float().mean(0))


def test_shifted_fp16_beyond_its_range_stays_finite(backend):
    """fp16 input near its largest value (65504) with a shift of the opposite sign: ``x - shift``
    reaches ~1.2e5, beyond fp16's range. No backend rounds it to fp16 (the shifted 16-bit path
    splits it into bf16 parts, fp32's range; the others subtract in fp32), so nothing turns into
    inf and the result matches the float64 spec (issue 22, "Bad input")."""
    n, d = 40, 9
    g = _gen(11)
    x = (60000.0 + 100.0 * torch.randn(n, d, generator=g)).clamp(max=65504).to(torch.float16).to(DEVICE)
    shift = torch.full((d,), -60000.0).to(DEVICE)
    _check(backend, torch.float16, [x], [None], shift)


def test_many_rows_few_columns(backend):
    """n >> d (Triton splits n across programs with atomic adds; the count is fused)."""
    x = _x(700, 5, torch.float32)
    _check(backend, torch.float32, [x], [None])
    _check(backend, torch.float32, [x], [_mask(700, "random")])


# ------------------------------------------------------------- arguments (every backend) ---------
@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.zeros(3, 4, 5)), "2-D"),
    (dict(x=torch.zeros(3, 4, dtype=torch.int32)), "float32, float16 or bfloat16"),
    (dict(cov=torch.zeros(4, 4, dtype=torch.float64)), "cov must be float32"),
    (dict(cov=torch.zeros(5, 5)), r"\(4, 4\)"),
    (dict(cov=lambda dev: torch.zeros(4, 8, device=dev)[:, ::2]), "contiguous"),  # view made on DEVICE
    (dict(colsum=torch.zeros(5)), "colsum"),
    (dict(mask=torch.ones(3, dtype=torch.int64)), "mask must be a bool"),
    (dict(mask=torch.ones(2, dtype=torch.bool)), "mask must be a bool"),
    (dict(shift=torch.zeros(4, dtype=torch.float16)), "shift"),
    (dict(cov=torch.zeros(4, 4, device="meta")), "meta"),
], ids=["3d", "int", "cov64", "covshape", "covstride", "colsum", "maskdtype", "masklen", "shiftdtype", "device"])
def test_bad_arguments_raise_before_writing(backend, bad, match):
    args = dict(cov=torch.zeros(4, 4), colsum=torch.zeros(4), x=torch.ones(3, 4), mask=None, shift=None)
    args = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
            for k, v in {**args, **bad}.items()}
    args = {k: (v(DEVICE) if callable(v) else v) for k, v in args.items()}
    before = args["cov"].clone() if args["cov"].device.type != "meta" else None
    with pytest.raises((ValueError, TypeError), match=match):
        cov_update(args["cov"], args["colsum"], args["x"], args["mask"], shift=args["shift"], backend=backend)
    if before is not None:
        assert torch.equal(args["cov"], before)


# ------------------------------------------------------------- the dispatcher op --------------------
@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_dispatcher_op_opcheck(with_mask):
    """``torch.ops.eva_kernels.cov_update``: schema, fake and the kernel the dispatcher runs here
    (the compiled one where the C++ extension is loaded, else the torch one)."""
    n, d = 37, 29
    g = _gen(17)
    x = torch.randn(n, d, generator=g).to(torch.bfloat16).to(DEVICE)
    mask = (torch.rand(n, generator=g) < 0.5).to(DEVICE) if with_mask else None
    args = (torch.zeros(d, d, device=DEVICE), torch.zeros(d, device=DEVICE), x, mask,
            torch.randn(d, generator=g).to(DEVICE))
    torch.library.opcheck(torch.ops.eva_kernels.cov_update.default, args)


def test_dispatcher_op_is_the_cpp_kernel_when_built():
    """One op per operation: the extension adds its kernels to ``eva_kernels::cov_update``."""
    table = torch._C._dispatch_dump("eva_kernels::cov_update")
    if "cpp" in eva_kernels.available_backends("cpu"):
        assert "bindings.cpp" in table.split("CPU:")[1].splitlines()[0]
    assert not hasattr(torch.ops.eva_kernels, "cov_update_cpp")


def test_compiles_with_the_torch_backend_and_the_op():
    d = 6
    cov, col = torch.zeros(d, d), torch.zeros(d)
    x, m = torch.randn(9, d), torch.ones(9, dtype=torch.bool)

    def f(cov, col, x, m):
        n1 = cov_update(cov, col, x, m, backend="torch")
        return n1 + torch.ops.eva_kernels.cov_update(cov, col, x, m, None)

    out = torch.compile(f, backend="eager", fullgraph=True)(cov, col, x, m)
    assert int(out) == 18
    torch.testing.assert_close(torch.triu(cov), torch.triu(2 * x.T @ x), rtol=1e-5, atol=1e-5)
