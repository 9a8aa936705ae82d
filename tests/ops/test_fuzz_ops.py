"""Property-based tests (hypothesis) of ``cov_update`` and ``topk_eigh`` on every CPU backend.

Every property draws a small, readable *description* of a case (shapes, dtype, layout, mask
kind, seeds, ...; printed on failure) and builds the tensors from it, then compares the backend
with the float64 specification of :mod:`eva_kernels.testing` / ``torch.linalg.eigh``.

Tolerances are error *bounds*, not fudge factors. ``cov_update``: the inputs are first rounded
to their dtype and the spec is applied to those rounded values, so only the backend's fp32
arithmetic remains, bounded by ``K u`` times the magnitude of what was summed (``K`` terms, unit
roundoff ``u``; observed errors are ~1/10 of it). A kernel that drops, duplicates or
mis-strides a row, leaks NaN from a dropped row, ignores the shift or overwrites instead of
accumulating is off by far more than that. ``topk_eigh``: residual / Weyl / Davis-Kahan bounds
of the requested ``tol``, plus a rounding allowance ``8 d u |A|`` for products with ``A`` in the
working dtype (observed rounding errors are ~1/10 of it).

Backends: ``torch`` and ``cpp`` share one test (same derandomized cases); ``triton`` (CPU
interpreter under ``TRITON_INTERPRET=1``, slow) has its own test with smaller shapes and fewer
examples. Example counts are fractions of the active hypothesis profile's ``max_examples``
(``ci`` by default, ``--hypothesis-profile=long`` for deeper runs; see ``conftest.py``).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
from hypothesis import currently_in_test_context, event, given, note, settings
from hypothesis import strategies as st

import eva_kernels
from eva_kernels import subspace_overlap, topk_eigh, topk_eigh_step
from eva_kernels.linalg import sym_from_upper
from eva_kernels.ops.cov_update import SPLIT_PRODUCT_ERROR
from eva_kernels.testing import cov_update_spec, covariance_spec
from helpers import TRITON_MARKS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
U = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}  # unit roundoff of the arithmetic


def _backend(name: str, op: str = "cov_update"):
    """``pytest.param`` for a backend: skipped (with the reason) when it cannot run on CPU here."""
    marks = list(TRITON_MARKS) if name == "triton" else []
    if name == "cpp" and op == "cov_update":
        marks.append(pytest.mark.cpp)  # its kernel runs with the default thread count (conftest)
    marks.append(pytest.mark.skipif(name not in eva_kernels.available_backends("cpu", op),
                                    reason=f"{name} cannot run {op} on cpu here"))
    return pytest.param(name, marks=marks, id=name)


FAST_BACKENDS = [_backend("torch"), _backend("cpp")]
TRITON = _backend("triton")
TRITON_EIGH = _backend("triton", "topk_eigh")
# cpp implements cov_update only (topk_eigh(backend="cpp") raises); torch is the fast eigensolver
FAST_EIGH_BACKENDS = [_backend("torch", "topk_eigh")]
_DEFAULT_THREADS = torch.get_num_threads()  # read at import, before conftest's per-test setting


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _kernel_threads(backend: str):
    """The cpp kernel runs multi-threaded (its threading is part of what is tested); the float64
    reference work around it stays on one thread (the 2 shared cores: no spin-wait storms)."""
    return _threads(_DEFAULT_THREADS if backend == "cpp" else 1)


def _examples(weight: float) -> int:
    """This test's share of the active profile's ``max_examples`` (the profile sets the budget)."""
    return max(2, round(settings.default.max_examples * weight))


def _property(check, backends, weight: float, cases):
    """A property test: ``check(backend, case)`` for each backend, on ``weight`` of the profile's
    examples drawn from the strategy ``cases``."""
    @pytest.mark.parametrize("backend", backends)
    @settings(max_examples=_examples(weight))
    @given(case=cases)
    def test(backend, case):
        check(backend, case)
    return test


def _note(msg: str) -> None:
    """``hypothesis.note`` (printed with a falsifying example); a no-op outside a given-test,
    so the ``check_*`` functions can also be called directly to reproduce a case."""
    if currently_in_test_context():
        note(msg)


def _event(msg: str) -> None:
    """``hypothesis.event`` (counted in ``--hypothesis-show-statistics``); no-op outside a test."""
    if currently_in_test_context():
        event(msg)


# ============================================================== strategies: cov_update ====
# d around the tile edges of every backend (triton interpreter 32 x 32 tiles and 16-row steps,
# GPU 64 / 128, cpp 24-wide packed panels), plus anything in range.
_EDGES = (1, 2, 15, 16, 17, 23, 24, 25, 31, 32, 33, 47, 48, 63, 64, 65, 127, 128, 129, 150)
LAYOUTS = ("contiguous", "transposed", "col_slice", "row_stride", "col_stride")
MASKS = ("absent", "all", "none", "random")


def dims(hi: int):
    return st.one_of(st.sampled_from([v for v in _EDGES if v <= hi]), st.integers(1, hi))


@dataclass(frozen=True)
class Batch:
    """One call of ``cov_update``: ``n`` rows laid out as ``layout``; ``mask`` kind (``random``
    keeps each row with probability ``keep``); ``poison`` writes NaN/+-Inf into dropped rows;
    ``mask_strided`` passes the mask as a stride-2 view (the skipped entries are inverted)."""
    n: int
    layout: str
    mask: str
    keep: float
    poison: bool
    mask_strided: bool
    seed: int


@dataclass(frozen=True)
class CovCase:
    """``batches`` accumulated into one (cov, colsum) prefilled with non-zero values.

    Rows are ``offset_j + scale * z`` (per-channel offsets in ``[-offset, offset]``), a
    ``zeros`` fraction of entries set to 0; ``shift``: absent | zero | random | strided |
    first_mean (the engine's choice: fp32 mean of the first batch's kept rows)."""
    d: int
    dtype: str
    shift: str
    scale: float
    offset: float
    zeros: float
    batches: Tuple[Batch, ...]
    seed: int


def batches(max_n: int, max_calls: int, first_keeps_rows: bool = False):
    def one(i):
        n_lo = 1 if (first_keeps_rows and i == 0) else 0
        masks = [m for m in MASKS if not (first_keeps_rows and i == 0 and m == "none")]
        return st.builds(Batch, n=st.integers(n_lo, max_n), layout=st.sampled_from(LAYOUTS),
                         mask=st.sampled_from(masks), keep=st.sampled_from([0.5, 0.1, 0.9]),
                         poison=st.booleans(), mask_strided=st.booleans(), seed=st.integers(0, 2 ** 16))
    return st.integers(1, max_calls).flatmap(lambda c: st.tuples(*[one(i) for i in range(c)]))


def cov_cases(max_n: int, max_d: int, max_calls: int = 3):
    return st.builds(
        CovCase, d=dims(max_d), dtype=st.sampled_from(["fp32", "fp16", "bf16"]),
        shift=st.sampled_from(["absent", "zero", "random", "strided", "first_mean"]),
        scale=st.sampled_from([1.0, 0.01, 10.0]), offset=st.sampled_from([0.0, 3.0, 100.0]),
        zeros=st.sampled_from([0.0, 0.0, 0.5, 1.0]),
        batches=batches(max_n, max_calls), seed=st.integers(0, 2 ** 16))


# ============================================================== building the tensors ====
def _layout(v: torch.Tensor, layout: str) -> torch.Tensor:
    """``v`` (n, d) as a view with the given strides; storage outside the view holds NaN."""
    n, d = v.shape
    if layout == "contiguous":
        return v.clone()
    if layout == "transposed":                       # strides (1, n)
        return v.mT.contiguous().mT
    if layout == "col_slice":                        # columns 3 : 3 + d of (n, d + 7)
        base = torch.full((n, d + 7), float("nan"), dtype=v.dtype)
        base[:, 3:3 + d] = v
        return base[:, 3:3 + d]
    if layout == "row_stride":                       # x[::2] of (2n, d)
        base = torch.full((2 * n, d), float("nan"), dtype=v.dtype)
        base[::2] = v
        return base[::2]
    if layout == "col_stride":                       # x[:, ::2] of (n, 2d)
        base = torch.full((n, 2 * d), float("nan"), dtype=v.dtype)
        base[:, ::2] = v
        return base[:, ::2]
    raise ValueError(layout)


def _mask(b: Batch, g: torch.Generator) -> Optional[torch.Tensor]:
    if b.mask == "absent":
        return None
    if b.mask == "all":
        m = torch.ones(b.n, dtype=torch.bool)
    elif b.mask == "none":
        m = torch.zeros(b.n, dtype=torch.bool)
    else:
        m = torch.rand(b.n, generator=g) < b.keep
    if b.mask_strided:
        base = torch.empty(2 * b.n, dtype=torch.bool)
        base[::2], base[1::2] = m, ~m                # a kernel ignoring the stride reads ~m
        m = base[::2]
    return m


def _poison(v: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
    """NaN, +Inf, -Inf (cycling) into every dropped row of ``v``, in place."""
    if mask is None:
        return
    dropped = (~mask).nonzero().flatten()
    for j, r in enumerate(dropped.tolist()):
        v[r] = (float("nan"), float("inf"), -float("inf"))[j % 3]


def _rows(case: CovCase, b: Batch, offsets: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    v = offsets + case.scale * torch.randn(b.n, case.d, generator=g)
    if case.zeros:
        v = torch.where(torch.rand(b.n, case.d, generator=g) < case.zeros, 0.0, v)
    return v


def _kept_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 mean of the kept rows (zeros if none), computed as eva/statistics.py does."""
    xf = x.to(torch.float32)
    if mask is None:
        return xf.mean(0) if x.shape[0] else xf.new_zeros(x.shape[1])
    kept = mask.sum().clamp_min(1).to(torch.float32)
    return torch.where(mask.unsqueeze(1), xf, xf.new_zeros(())).sum(0) / kept


def build_cov_case(case: CovCase):
    """(list of (x, mask), shift) for ``case``: x in its dtype and layout, poisoned dropped rows."""
    g = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    offsets = case.offset * (2 * torch.rand(case.d, generator=g) - 1)
    calls = []
    for b in case.batches:
        gb = torch.Generator().manual_seed(b.seed)
        v = _rows(case, b, offsets, gb).to(dtype)
        mask = _mask(b, gb)
        if b.poison:
            _poison(v, mask)
        calls.append((_layout(v, b.layout), mask))
    if case.shift == "absent":
        shift = None
    elif case.shift == "zero":
        shift = torch.zeros(case.d)
    elif case.shift == "random":
        shift = offsets + case.scale * torch.randn(case.d, generator=g)
    elif case.shift == "strided":
        shift = (offsets + case.scale * torch.randn(case.d, generator=g)).repeat_interleave(2)[::2]
    else:  # first_mean: NaN-free because dropped rows are excluded
        shift = _kept_mean(*calls[0])
        shift = torch.nan_to_num(shift, nan=0.0, posinf=0.0, neginf=0.0)
    return calls, shift


def _kept_rows64(x, mask, shift) -> torch.Tensor:
    y = x.to(torch.float64)
    if mask is not None:
        y = y[mask]
    return y - shift.to(torch.float64) if shift is not None else y


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


# ============================================================== property: cov_update ====
def check_cov_update(backend: str, case: CovCase) -> None:
    """``cov_update`` (several calls, "+=" into non-zero prefilled cov/colsum) == float64 spec.

    * returned count: 0-d int64 on x's device, equal to the number of kept rows;
    * upper triangle of cov and colsum within ``2 K u (|start| + sum_rows |y_i| |y_j|)``,
      ``K`` = rows kept over all calls + calls + 2 (fp32 summation bound, any order, plus the
      rounding of ``x - shift``): i.e. only fp32 accumulation error;
    * NaN/Inf in dropped rows or outside the view of x never reach cov/colsum;
    * x, mask and shift are not modified.
    """
    with _threads(1):
        _check_cov_update(backend, case)


def _check_cov_update(backend: str, case: CovCase) -> None:
    calls, shift = build_cov_case(case)
    d = case.d
    g = torch.Generator().manual_seed(case.seed + 1)
    mag = max(case.scale, case.offset) ** 2 * 10
    cov0 = torch.randn(d, d, generator=g) * mag       # not symmetric: lower != upper
    colsum0 = torch.randn(d, generator=g) * math.sqrt(mag)
    cov, colsum = cov0.clone(), colsum0.clone()
    ref_cov, ref_colsum = cov0.double(), colsum0.double()
    abs_cov, abs_col = cov0.double().abs(), colsum0.double().abs()
    rows_kept = 0
    shift_before = None if shift is None else shift.clone()
    for i, (x, mask) in enumerate(calls):
        x_before, mask_before = x.clone(), None if mask is None else mask.clone()
        with _kernel_threads(backend):
            count = eva_kernels.cov_update(cov, colsum, x, mask, shift=shift, backend=backend)
        expected = cov_update_spec(ref_cov, ref_colsum, x, mask, shift)
        assert isinstance(count, torch.Tensor) and count.dtype == torch.int64 and count.dim() == 0, \
            f"call {i}: count must be a 0-d int64 tensor, got {count!r}"
        assert count.device == x.device
        assert int(count) == expected, f"call {i}: count {int(count)} != {expected} kept rows"
        assert _same(x, x_before), f"call {i}: x was modified"
        assert mask is None or torch.equal(mask, mask_before), f"call {i}: mask was modified"
        y = _kept_rows64(x, mask, shift).abs()
        abs_cov += y.mT @ y
        abs_col += y.sum(0)
        rows_kept += expected
    assert shift is None or torch.equal(shift, shift_before), "shift was modified"

    k_terms = rows_kept + len(calls) + 2
    tiny = k_terms * torch.finfo(torch.float32).tiny
    up = torch.triu(torch.ones(d, d, dtype=torch.bool))
    err = (cov.double() - ref_cov).abs()
    # the triton kernel multiplies shifted 16-bit rows as a bf16 split: a bounded error per product
    split = backend == "triton" and shift is not None and DTYPES[case.dtype] != torch.float32
    product_u = 1.01 * SPLIT_PRODUCT_ERROR if split else 0.0
    tol = (2 * k_terms * U[torch.float32] + product_u) * abs_cov + tiny
    bad = up & ~(err <= tol)                            # NaN counts as bad
    if bad.any():
        i, j = bad.nonzero()[0].tolist()
        raise AssertionError(f"cov[{i},{j}] = {cov[i, j].item()!r}, spec {ref_cov[i, j].item()!r}, "
                             f"|err| {err[i, j].item():.3g} > tol {tol[i, j].item():.3g} "
                             f"({int(bad.sum())} bad entries of the upper triangle)")
    cerr = (colsum.double() - ref_colsum).abs()
    ctol = 2 * k_terms * U[torch.float32] * abs_col + tiny
    cbad = ~(cerr <= ctol)
    if cbad.any():
        j = int(cbad.nonzero()[0])
        raise AssertionError(f"colsum[{j}] = {colsum[j].item()!r}, spec {ref_colsum[j].item()!r}, "
                             f"|err| {cerr[j].item():.3g} > tol {ctol[j].item():.3g}")


test_cov_update_matches_spec = _property(check_cov_update, FAST_BACKENDS, 1.0, cov_cases(max_n=300, max_d=150))
test_cov_update_matches_spec_triton = _property(check_cov_update, [TRITON], 0.35,
                                                cov_cases(max_n=90, max_d=70, max_calls=2))


# ============================================================== centring cancellation ====
@dataclass(frozen=True)
class CentringCase:
    """Rows ``offset_j + spread_j z``: per-channel ``|offset_j|`` log-uniform in
    ``[1, 10**max_log_offset]`` (random sign), ``spread_j`` log-uniform in ``[1e-3, 1]``."""
    d: int
    dtype: str
    max_log_offset: float
    batches: Tuple[Batch, ...]
    seed: int


def centring_cases(max_n: int, max_d: int, max_calls: int = 3):
    return st.builds(
        CentringCase, d=dims(max_d), dtype=st.sampled_from(["fp32", "fp32", "fp16", "bf16"]),
        max_log_offset=st.sampled_from([4.0, 3.0, 1.0]),
        batches=batches(max_n, max_calls, first_keeps_rows=True), seed=st.integers(0, 2 ** 16))


def check_centring(backend: str, case: CentringCase) -> None:
    """Accumulating about ``shift`` = first batch's mean (as the engine does) keeps the centred
    scatter ``sym(cov) - colsum colsum^T / count`` accurate when the channel means (up to 1e4)
    dwarf the spread (down to 1e-3): it must equal ``covariance_spec`` of the kept rows in
    float64 to ``4 K u sum_i |x_i - shift|^2`` (the size of what was actually summed, i.e.
    the scatter's own trace plus ``|colsum|^2 / count``) and to ``8 K u sqrt(d)`` relative to
    its own Frobenius norm, ``K`` = rows + calls + 2. Without the shift the fp32 sums would
    carry errors of order ``K u |offset|^2``, many orders of magnitude more.
    """
    with _threads(1):
        _check_centring(backend, case)


def _check_centring(backend: str, case: CentringCase) -> None:
    g = torch.Generator().manual_seed(case.seed)
    d, dtype = case.d, DTYPES[case.dtype]
    sign = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)
    offsets = sign * 10 ** (case.max_log_offset * torch.rand(d, generator=g, dtype=torch.float64))
    spread = 10 ** (-3 * torch.rand(d, generator=g, dtype=torch.float64))
    calls = []
    for i, b in enumerate(case.batches):
        gb = torch.Generator().manual_seed(b.seed)
        v = (offsets + spread * torch.randn(b.n, d, generator=gb, dtype=torch.float64)).to(dtype)
        mask = _mask(b, gb)
        if i == 0 and mask is not None and not mask.any():
            mask[0] = True                              # the shift needs a kept row
        if b.poison:
            _poison(v, mask)
        calls.append((_layout(v, b.layout), mask))
    shift = _kept_mean(*calls[0]).contiguous()

    cov, colsum = torch.zeros(d, d), torch.zeros(d)
    count = torch.zeros((), dtype=torch.int64)
    kept = []
    for x, mask in calls:
        with _kernel_threads(backend):
            count += eva_kernels.cov_update(cov, colsum, x, mask, shift=shift, backend=backend)
        kept.append(x.to(torch.float64)[mask] if mask is not None else x.to(torch.float64))
    rows = torch.cat(kept)
    assert int(count) == rows.shape[0]
    c = colsum.double()
    centred = sym_from_upper(cov).double() - torch.outer(c, c) / count.double().clamp_min(1)
    spec = covariance_spec(rows)
    err = torch.linalg.matrix_norm(centred - spec).item()
    k_terms = rows.shape[0] + len(calls) + 2
    budget = ((rows - shift.double()) ** 2).sum().item()
    norm = torch.linalg.matrix_norm(spec).item()
    _note(f"|offset| max {offsets.abs().max().item():.3g}, spread min {spread.min().item():.3g}, "
         f"|C| {norm:.3g}, sum|y|^2 {budget:.3g}, err {err:.3g}")
    # shifted 16-bit rows go through the triton kernel's bf16 split: a bounded error per product
    split = backend == "triton" and dtype != torch.float32
    split_err = (1.01 * SPLIT_PRODUCT_ERROR if split else 0.0) * budget
    bound = 4 * k_terms * U[torch.float32] * budget + split_err
    assert err <= bound + 1e-30, f"centred scatter off by {err:.3g}; bound {bound:.3g}"
    if norm > 0:
        assert err <= 8 * k_terms * U[torch.float32] * math.sqrt(d) * norm + split_err, \
            f"centred scatter relative error {err / norm:.3g}"


test_centring_cancellation = _property(check_centring, FAST_BACKENDS, 0.6, centring_cases(max_n=200, max_d=100))
test_centring_cancellation_triton = _property(check_centring, [TRITON], 0.2,
                                              centring_cases(max_n=70, max_d=48, max_calls=2))


# ============================================================== property: topk_eigh ====
@dataclass(frozen=True)
class EighCase:
    """A PSD operator with a controlled spectrum, given by its upper triangle.

    Spectrum of Sigma: ``plateau`` equal leading eigenvalues ``top``, then geometric decay by
    ``decay``; divided by ``gap`` from index ``gap_at`` on (0: no extra gap); 0 from ``rank``.
    ``centred``: ``cov = count (Sigma + mu mu^T)``, ``colsum = count mu`` with
    ``|mu| = mean_scale sqrt(top)`` (built in float64, then cast), so the centred operator
    is ``count Sigma``; ``count_as`` tensor | int. ``lower``: what the strict lower
    triangle holds (mirror | noise | nan; never read). ``init``: none | previous (basis of a
    cheaper solve) | random (``init_rows`` Gaussian rows). ``tol``: converged solve or not.
    """
    d: int
    k: int
    dtype: str
    top: float
    decay: float
    plateau: int
    gap_at: int
    gap: float
    rank: int
    centred: bool
    count: int
    count_as: str
    mean_scale: float
    lower: str
    init: str
    init_rows: int
    tol: bool
    oversample: int
    iters: int
    seed: int


# residual tolerance of converged solves (relative to theta_1), per dtype
SOLVE_TOL = {torch.float32: 2e-4, torch.float64: 1e-10}


@st.composite
def eigh_cases(draw, max_d: int, max_k: Optional[int] = None):
    d = draw(dims(max_d))
    k = draw(st.integers(1, d if max_k is None else max(1, min(d, max_k))))
    tol = draw(st.booleans())
    centred = draw(st.booleans())
    return EighCase(
        d=d, k=k, dtype=draw(st.sampled_from(["fp32", "fp64"])),
        top=draw(st.sampled_from([1.0, 1e-3, 1e3])),
        decay=draw(st.floats(0.2, 0.85)),
        plateau=draw(st.integers(1, d)),
        gap_at=draw(st.one_of(st.just(0), st.integers(1, d))),
        gap=draw(st.sampled_from([3.0, 100.0])),
        rank=draw(st.one_of(st.just(d), st.integers(1, d))),
        centred=centred,
        count=draw(st.sampled_from([1, 7, 2 ** 31, 2 ** 31 - 1, 3 * 2 ** 24 + 1]) | st.integers(1, 2 ** 31))
        if centred else 1,
        count_as=draw(st.sampled_from(["tensor", "int"])) if centred else "tensor",
        mean_scale=draw(st.sampled_from([0.0, 0.5, 2.0])) if centred else 0.0,
        lower=draw(st.sampled_from(["mirror", "noise", "nan"])),
        init=draw(st.sampled_from(["none", "previous", "random"])),
        init_rows=draw(st.integers(1, d)),
        tol=tol,
        # converged solves need a block that outruns the decay: oversample >= 2
        oversample=draw(st.sampled_from([2, 8] if tol else [0, 2, 8])),
        iters=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2 ** 16)),
    )


def spectrum(case: EighCase) -> torch.Tensor:
    i = torch.arange(case.d, dtype=torch.float64)
    lam = case.top * case.decay ** (i - case.plateau + 1).clamp_min(0)
    if case.gap_at:
        lam = torch.where(i >= case.gap_at, lam / case.gap, lam)
    return torch.where(i >= case.rank, 0.0, lam)


def build_eigh_case(case: EighCase):
    """(cov with junk below the diagonal, colsum, count argument, float64 operator A)."""
    g = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    d = case.d
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    sigma = (q * spectrum(case)) @ q.mT
    sigma = 0.5 * (sigma + sigma.mT)
    colsum = count = None
    if case.centred:
        mu = torch.randn(d, generator=g, dtype=torch.float64)
        mu = mu / mu.norm() * case.mean_scale * math.sqrt(case.top)
        n = float(case.count)
        cov64 = n * sigma + torch.outer(n * mu, n * mu) / n
        colsum = (n * mu).to(dtype)
        count = torch.tensor(case.count, dtype=torch.int64) if case.count_as == "tensor" else case.count
    else:
        cov64 = sigma
    cov = cov64.to(dtype)
    lower = torch.tril(torch.ones(d, d, dtype=torch.bool), -1)
    if case.lower == "noise":
        cov = torch.where(lower, torch.randn(d, d, generator=g, dtype=dtype) * cov.abs().max(), cov)
    elif case.lower == "nan":
        cov = torch.where(lower, torch.full_like(cov, float("nan")), cov)
    # the operator the solver is asked about: upper triangle of the *cast* values, in float64
    a = sym_from_upper(cov.double())
    if colsum is not None:
        c = colsum.double()
        a = a - torch.outer(c, c) / float(case.count)
    return cov, colsum, count, a


def check_topk_eigh(backend: str, case: EighCase) -> None:
    """``topk_eigh`` against ``torch.linalg.eigh`` of the float64 operator ``A``.

    Always: shapes and dtype; finite; eigenvalues descending and >= 0; orthonormal rows;
    each eigenvalue is the (clamped) Rayleigh quotient ``v^T A v`` of its vector and at most the
    matching exact eigenvalue (Ritz values interlace). For converged solves (``tol`` set, or
    the block covering the space so the dense path runs): residuals ``|A v - theta v|`` below
    ``tol theta_1``, eigenvalues within the residual bound of ``eigh``'s (so within
    ``sqrt(k) tol`` relative to ``lambda_1``), and wherever the spectrum has a gap after
    ``j <= k`` large enough for Davis-Kahan to say so, the top-j subspaces agree.
    ``eps`` = ``8 d u |A|`` covers the rounding of products with ``A`` in the working dtype.
    """
    dtype = DTYPES[case.dtype]
    cov, colsum, count, a = build_eigh_case(case)
    d, k = case.d, case.k
    lam, vecs = torch.linalg.eigh(a)
    lam, vecs = lam.flip(0), vecs.flip(1).mT             # descending, rows
    lam_c = lam.clamp_min(0)
    scale = torch.linalg.matrix_norm(sym_from_upper(cov.double()), 2).item()
    if colsum is not None:
        scale += (colsum.double() @ colsum.double()).item() / float(case.count)
    eps = 8 * d * U[dtype] * scale + 1e-300
    init = None
    if case.init == "previous":
        init = topk_eigh_step(cov, k, colsum=colsum, count=count, iters=1, seed=case.seed + 1,
                              return_basis=True, backend=backend).basis
    elif case.init == "random":
        init = torch.randn(case.init_rows, d, generator=torch.Generator().manual_seed(case.seed + 2))
    tol = SOLVE_TOL[dtype] if case.tol else None
    res = topk_eigh(cov, k, colsum=colsum, count=count, init=init, oversample=case.oversample,
                    iters=case.iters, seed=case.seed, tol=tol, backend=backend)
    theta, v = res.eigenvalues, res.eigenvectors
    _note(f"exact top eigenvalues {lam[:k].tolist()[:6]}..., returned {theta.tolist()[:6]}..., eps {eps:.3g}")

    assert theta.shape == (k,) and v.shape == (k, d), (theta.shape, v.shape)
    assert theta.dtype == dtype and v.dtype == dtype
    assert torch.isfinite(theta).all() and torch.isfinite(v).all(), "non-finite result"
    assert (theta >= 0).all(), f"negative eigenvalue {theta.min().item()}"
    assert (theta[:-1] >= theta[1:]).all(), f"eigenvalues not descending: {theta.tolist()}"
    v64, th64 = v.double(), theta.double()
    ortho = (v64 @ v64.mT - torch.eye(k, dtype=torch.float64)).abs().max().item()
    assert ortho <= 64 * d * U[dtype], f"rows not orthonormal: max |V V^T - I| = {ortho:.3g}"

    av = v64 @ a                                         # rows: (A v_i)^T
    rayleigh = (av * v64).sum(1).clamp_min(0)
    rq_err = (th64 - rayleigh).abs().max().item()
    assert rq_err <= eps, f"eigenvalues are not the Rayleigh quotients of their vectors: {rq_err:.3g} > {eps:.3g}"
    assert (th64 <= lam_c[:k] + eps).all(), \
        f"eigenvalue above the exact one: {(th64 - lam_c[:k]).max().item():.3g} > {eps:.3g}"

    dense = min(d, k + case.oversample) == d
    _event("path: dense eigh" if dense else "path: subspace iteration")
    if not (dense or case.tol):
        return                                           # a few iterations: no accuracy promise
    resid = (av - th64[:, None] * v64).norm(dim=1)
    allowed = (0.0 if dense else 1.5 * tol * th64[0].item()) + eps
    assert (resid <= allowed).all(), \
        f"residual |A v - theta v| = {resid.max().item():.3g} > {allowed:.3g}"
    r_norm = math.sqrt(k) * allowed                      # bound on the block residual |R|_2
    val_err = (th64 - lam_c[:k]).abs()
    assert (val_err <= r_norm + eps).all(), \
        f"eigenvalue error {val_err.max().item():.3g} > {r_norm + eps:.3g} (lambda_1 = {lam[0].item():.3g})"
    for j in range(1, min(k, d - 1) + 1):
        gap = (lam[j - 1] - lam[j]).item() - r_norm - eps  # Davis-Kahan: sin <= |R| / gap
        if gap <= 0 or r_norm / gap > 0.1:
            continue
        sin2 = min(1.0, (math.sqrt(j) * allowed / gap) ** 2)
        overlap = float(subspace_overlap(v64[:j], vecs[:j]))
        assert overlap >= 1 - sin2 / j - 2 * ortho - 8 * d * U[dtype], \
            f"top-{j} subspace overlap {overlap:.12f} (gap {gap:.3g}, residual bound {allowed:.3g})"


test_topk_eigh_matches_eigh = _property(check_topk_eigh, FAST_EIGH_BACKENDS, 1.0, eigh_cases(max_d=120))
# mostly b < d: the Triton products run
test_topk_eigh_matches_eigh_triton = _property(check_topk_eigh, [TRITON_EIGH], 0.4, eigh_cases(max_d=64, max_k=12))
