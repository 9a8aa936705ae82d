"""Triton ``cov_update`` against the float64 spec (``reference.cov_update_spec``).

Runs on CUDA when available, else on CPU tensors under ``TRITON_INTERPRET=1``. Sizes are not
multiples of the block sizes (interpreter blocks: 32 x 32 tiles, 16-row steps; GPU: 64/128).
Only the upper triangle of ``cov`` is compared (the strictly lower one is unspecified).
"""
from __future__ import annotations


import pytest
import torch

import eva_kernels
from eva_kernels.reference import cov_update_spec

from _triton_marks import DEVICE, TRITON_MARKS

pytestmark = TRITON_MARKS

# max |cov - ref| / max|ref| on the upper triangle, and the same for colsum
TOL = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 1e-3}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _triton_ok():
    if "triton" not in eva_kernels.available_backends(DEVICE):
        pytest.skip(f"triton backend unavailable: {eva_kernels._optional_backends.LOAD_ERRORS}")


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    err = (a.double().cpu() - ref.cpu()).abs().max().item()
    return err / scale if scale > 0 else err


def _run(x, mask=None, shift=None, calls=1, seed=0):
    """Run triton on a random symmetric start value, return (cov, colsum, count, ref...)."""
    _triton_ok()
    d = x.shape[1]
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g)
    cov0 = (a + a.mT).to(DEVICE)
    cs0 = torch.randn(d, generator=g).to(DEVICE)
    cov, cs = cov0.clone(), cs0.clone()
    ref, ref_cs = cov0.double().cpu(), cs0.double().cpu()
    counts, ref_counts = [], []
    for _ in range(calls):
        counts.append(eva_kernels.cov_update(cov, cs, x, mask, shift=shift, backend="triton"))
        ref_counts.append(cov_update_spec(ref, ref_cs, x.cpu(), None if mask is None else mask.cpu(),
                                          None if shift is None else shift.cpu()))
    return cov, cs, counts, ref, ref_cs, ref_counts, cov0


def _check(x, mask=None, shift=None, calls=1, tol=None):
    cov, cs, counts, ref, ref_cs, ref_counts, cov0 = _run(x, mask, shift, calls)
    tol = TOL[x.dtype] if tol is None else tol
    up = torch.triu(torch.ones_like(ref, dtype=torch.bool))
    # compare the update itself (not dominated by the random start value) ...
    upd, ref_upd = (cov.double().cpu() - cov0.double().cpu())[up], (ref - cov0.double().cpu())[up]
    if ref_upd.abs().max() > 0:
        assert _rel(upd, ref_upd) <= tol
    else:
        assert upd.abs().max().item() == 0.0  # nothing kept: nothing may change
    # ... and the accumulated matrix
    assert _rel(cov[up.to(cov.device)], ref[up]) <= tol
    assert _rel(cs, ref_cs) <= max(tol, 1e-5) * 4
    for c, rc in zip(counts, ref_counts):
        assert c.dtype == torch.int64 and c.dim() == 0 and c.device == x.device
        assert int(c) == rc


def _x(n, d, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) + 0.5).to(dtype).to(DEVICE)


def _mask(n, kind, seed=2):
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(n, dtype=torch.bool, device=DEVICE)
    if kind == "nothing":
        return torch.zeros(n, dtype=torch.bool, device=DEVICE)
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < 0.6).to(DEVICE)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("d", [1, 63, 130], ids=lambda v: f"d{v}")
@pytest.mark.parametrize("n", [0, 1, 257], ids=lambda v: f"n{v}")
def test_sizes_dtypes(n, d, dtype):
    _check(_x(n, d, dtype), _mask(n, "random"))


@pytest.mark.parametrize("mask_kind", ["none", "all", "nothing", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_masks(mask_kind, dtype):
    n, d = 75, 40
    _check(_x(n, d, dtype), _mask(n, mask_kind))


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shifted", [False, True], ids=["noshift", "shift"])
def test_dropped_rows_with_nan_inf_do_not_leak(dtype, shifted):
    n, d = 70, 37
    x = _x(n, d, dtype)
    mask = _mask(n, "random")
    x[~mask] = float("nan")
    x[(~mask).nonzero()[::2, 0], 3] = float("inf")
    shift = torch.randn(d, device=DEVICE) if shifted else None
    cov, cs, counts, *_ = _run(x, mask, shift)
    assert torch.isfinite(torch.triu(cov)).all() and torch.isfinite(cs).all()
    _check(x, mask, shift)


@pytest.mark.parametrize("layout", ["col_slice", "transposed", "every_other_row", "offset_view"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_x(layout, dtype):
    n, d = 67, 45
    g = torch.Generator().manual_seed(3)

    def base(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    if layout == "col_slice":
        x = base(n, d + 19)[:, 7:7 + d]
    elif layout == "transposed":          # column stride n, row stride 1
        x = base(d, n).t()
    elif layout == "every_other_row":
        x = base(2 * n, d)[::2]
    else:                                  # non-zero storage offset, both strides odd
        x = base(n + 3, d + 2)[3:, 1:1 + d]
    assert not x.is_contiguous()
    _check(x, _mask(n, "random"), torch.randn(d, device=DEVICE) * 0.3)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_shift_large_offset(dtype):
    """Channels with a mean ~1e3 x their spread: shifting by the mean keeps fp32 accurate."""
    n, d = 90, 33
    g = torch.Generator().manual_seed(4)
    mu = torch.linspace(-1, 1, d) * 1e3
    x = (mu + torch.randn(n, d, generator=g)).to(dtype).to(DEVICE)
    shift = x[:8].float().mean(0)
    _check(x, _mask(n, "random"), shift)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_accumulates_over_calls(dtype):
    _check(_x(50, 70, dtype), _mask(50, "random"), calls=3)


def test_count_without_mask_and_large_n_split_path():
    # d small, n large: several programs per tile along n (atomic adds), count fused
    x = _x(700, 5, torch.float32)
    _check(x, None)
    _check(x, _mask(700, "random"))


def test_unavailable_message_is_clear():
    from eva_kernels.triton_backend._config import why_not
    assert why_not("mps") is not None
    msg = why_not("cpu")
    if msg is not None:
        assert "TRITON_INTERPRET=1" in msg


def test_opcheck():
    _triton_ok()
    n, d = 20, 9
    x = _x(n, d, torch.float32)
    args = (torch.zeros(d, d, device=DEVICE), torch.zeros(d, device=DEVICE), x,
            _mask(n, "random"), torch.randn(d, device=DEVICE), "triton")
    torch.library.opcheck(torch.ops.eva_kernels.cov_update.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
