"""``cov_update``: the fused, masked, shifted activation-covariance update.

Math (every backend). For the rows ``x_i`` of ``x (n, d)`` with ``mask[i]`` and an optional
fixed reference ``s (d,)`` (the *shift*), with ``y_i = float32(x_i) - s``::

    cov    += sum_i y_i^T y_i          (d, d), fp32
    colsum += sum_i y_i                (d,),   fp32
    return    #{i : mask[i]}           0-d int64 on x.device

Rows with ``mask[i] == False`` never contribute, even if they hold NaN or Inf. Backends
update at least the upper triangle (row <= col) of ``cov``; the strictly lower triangle is
unspecified afterwards. Every reader of ``cov`` (:func:`eva_kernels.topk_eigh`) reads the
upper triangle only. The float64 specification is :func:`eva_kernels.testing.cov_update_spec`.

Accuracy contract: fp32 accumulation of the products ``y_ia y_ib``. The products are exact in
fp32 except for 16-bit ``x`` with a shift on GPU kernels, which multiply ``y`` as a bf16 hi/lo
split on tensor cores (``y ~= hi + lo``, three bf16 products): there each product has relative
error <= :data:`SPLIT_PRODUCT_ERROR` (``3 * 2^-18``, about 1.1e-5), so the error of an entry is
at most that times ``sum_i |y_ia y_ib|``, plus fp32 accumulation. ``colsum`` is always summed
from the exact fp32 ``y``.

``precision="fast"`` (16-bit ``x`` with a shift, on the ``triton`` backend; elsewhere it is the
exact path): one tensor-core product per pair. The raw 16-bit rows are multiplied (exact
products, fp32 accumulation) and the shift is taken out per chunk of ``CHUNK_ROWS`` (512) rows,
from the chunk's column sums ``u = sum (x - s)`` and kept count ``c``:
``sum (x - s)(x - s)^T = sum x x^T - s z^T - z s^T`` with ``z = u + (c / 2) s``. The products are
exact but the accumulator carries each chunk's raw sum, whose rounding no longer cancels: to
first order an entry's error is at most :data:`FAST_PRODUCT_ERROR` times
``sum_i (|x_ia x_ib| + |s_a s_b|)``, plus the fp32 accumulation of the centred sum. Relative to
the largest entry that is about ``2^-24 (CHUNK_ROWS / 32) R`` where
``R = max_j E[x_j^2] / max_j Var[x_j]`` (:func:`fast_error_estimate`; measured 1-2 ``2^-24 R`` in
``benches/accuracy``), so it suits data whose means do not dwarf their spread; the engine routes
each group by its measured ``R`` (``EvaOptions.statistics_precision``).

The op ``torch.ops.eva_kernels.cov_update(cov, colsum, x, mask, shift) -> Tensor`` is declared
once, here, with its fake (so it traces under ``torch.compile``); its default kernel is the
``torch`` implementation and the C++ extension adds compiled CPU/CUDA kernels to it
(``csrc/bindings.cpp``). :func:`cov_update` validates, resolves the backend
(:mod:`eva_kernels._registry`) and runs it.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .._registry import Backend, resolve
from ..backends.torch.cov_update import cov_update_torch
from ..linalg import sym_from_upper

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Bound on the relative error of one product ``y_a y_b`` computed by the bf16 split (module
#: docstring): with ``hi = rn_bf16(y)``, ``lo = rn_bf16(y - hi)``, ``|y - hi - lo| <= 2^-18 |y|``
#: and the dropped ``|lo_a lo_b| <= 2^-18 |y_a y_b|``, so ``<= 3 * 2^-18`` (to first order).
SPLIT_PRODUCT_ERROR = 3 * 2.0 ** -18

#: Rows per chunk of the fast path (the triton kernel's ``CHUNK_ROWS``).
FAST_CHUNK_ROWS = 512

#: First-order bound of the fast path's error per ``sum_i (|x_ia x_ib| + |s_a s_b|)`` (module
#: docstring): the tensor cores add 16-product groups to the fp32 accumulator, rounding (or, on
#: NVIDIA hardware, truncating: ``2^-23``) each time against a value that holds up to one chunk's
#: raw sum, ``FAST_CHUNK_ROWS / 16`` times per chunk, plus the rank-2 shift correction (4 more).
FAST_PRODUCT_ERROR = 2.0 ** -23 * (FAST_CHUNK_ROWS / 16 + 4)

#: Largest ``R`` (:func:`moment_ratio`) for which callers should choose ``precision="fast"``:
#: :func:`fast_error_estimate` is then <= 6.1e-5 of the largest entry, under the 1e-4 tolerance
#: of 16-bit statistics with a margin of 1.6 (measured: ``benches/accuracy``).
FAST_RATIO_LIMIT = 64.0

_PRECISIONS = ("exact", "fast")


def moment_ratio(sq_sums: Tensor, colsum: Tensor, count, shift: Optional[Tensor]) -> Tensor:
    """``R = max_j E[x_j^2] / max_j Var[x_j]`` of the rows accumulated so far (float64, ``(...)``).

    From what ``cov_update`` keeps: ``sq_sums`` (..., d) the diagonal ``sum_i (x_ij - s_j)^2``,
    ``colsum`` (..., d) ``sum_i (x_ij - s_j)``, ``count`` the rows, ``shift`` (d,) or None:
    ``Var = sq / count - (colsum / count)^2`` and ``E[x^2] = Var + (colsum / count + s)^2``.
    Leading dimensions are batch dimensions (several statistics at once: ``count`` (...,) then).
    ``inf`` where there is no variance. No host sync.
    """
    sq, cs = sq_sums.double(), colsum.double()
    c = (count.to(torch.float64) if isinstance(count, Tensor)
         else torch.full((), float(count), dtype=torch.float64, device=sq.device)).clamp_min(1)
    c = c.reshape(c.shape + (1,) * (sq.dim() - c.dim()))
    mean_y = cs / c                                     # E[x - s]
    var_j = (sq / c - mean_y * mean_y).clamp_min(0)
    s = 0.0 if shift is None else shift.double()
    raw = (var_j + (mean_y + s) ** 2).amax(-1)          # max_j E[x_j^2]
    var = var_j.amax(-1)
    return torch.where(var > 0, raw / var.clamp_min(torch.finfo(torch.float64).tiny), torch.inf)


def fast_error_estimate(ratio: float) -> float:
    """Expected error of the fast path relative to the largest entry, for ``R = ratio``.

    ``R = max_j E[x_j^2] / max_j Var[x_j]`` (second moments about zero against the largest
    variance). Each of the ``n / 16`` accumulator additions rounds toward zero (a bias, so the
    errors add up) against a value holding on average half a chunk's raw sum,
    ``(FAST_CHUNK_ROWS / 2) E[x^2]``, costing ``2^-24`` of it on average: summed, ``2^-24 n
    (FAST_CHUNK_ROWS / 32) E[x^2]`` against the entry's ``n Var``.
    """
    return 2.0 ** -24 * (FAST_CHUNK_ROWS / 32) * float(ratio)


def _describe(t) -> str:
    return f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"


def check_cov_update_args(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor],
                          shift: Optional[Tensor]) -> None:
    """Raise a clear error for bad arguments, before anything is written."""
    for name, t in (("cov", cov), ("colsum", colsum), ("x", x)):
        if not isinstance(t, Tensor):
            raise TypeError(f"cov_update: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"cov_update: x must be 2-D (n, d), got shape {tuple(x.shape)}; "
                         "flatten leading dimensions with x.reshape(-1, d)")
    n, d = x.shape
    if x.dtype not in _X_DTYPES:
        raise TypeError(f"cov_update: x must be float32, float16 or bfloat16, got {x.dtype}")
    if cov.shape != (d, d) or cov.dtype != torch.float32:
        raise ValueError(f"cov_update: cov must be float32 ({d}, {d}) to match x's d={d}, got {_describe(cov)}")
    if not cov.is_contiguous():
        raise ValueError("cov_update: cov must be contiguous (it is updated in place)")
    if colsum.shape != (d,) or colsum.dtype != torch.float32 or not colsum.is_contiguous():
        raise ValueError(f"cov_update: colsum must be a contiguous float32 ({d},) tensor, got {_describe(colsum)}")
    devs = {"cov": cov.device, "colsum": colsum.device}
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (n,):
            raise ValueError(f"cov_update: mask must be a bool ({n},) tensor, got {_describe(mask)}")
        devs["mask"] = mask.device
    if shift is not None:
        if not isinstance(shift, Tensor) or shift.shape != (d,) or shift.dtype != torch.float32:
            raise ValueError(f"cov_update: shift must be a float32 ({d},) tensor, got {_describe(shift)}")
        devs["shift"] = shift.device
    for name, dev in devs.items():
        if dev != x.device:
            raise ValueError(f"cov_update: {name} is on {dev} but x is on {x.device}; move them to one device")


#: The op's schema, written out: torch < 2.5 cannot infer one from this module's string
#: annotations (``from __future__ import annotations``), and the C++ kernels register into it.
COV_UPDATE_SCHEMA = "(Tensor(a0!) cov, Tensor(a1!) colsum, Tensor x, Tensor? mask, Tensor? shift) -> Tensor"


@torch.library.custom_op("eva_kernels::cov_update", mutates_args=("cov", "colsum"), schema=COV_UPDATE_SCHEMA)
def cov_update_op(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor],
                  shift: Optional[Tensor]) -> Tensor:
    """The dispatcher op: compiled kernel where the extension provides one, else ``torch``."""
    return cov_update_torch(cov, colsum, x, mask, shift)


@cov_update_op.register_fake
def _(cov, colsum, x, mask, shift):
    return x.new_empty((), dtype=torch.int64)


def cov_update(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor] = None, *,
               shift: Optional[Tensor] = None, backend: Union[str, Backend, None] = None,
               precision: str = "exact") -> Tensor:
    """Fused activation-covariance update, in place (see the module docstring for the math).

    Args:
        cov: (d, d) float32, contiguous. Only the upper triangle (row <= col) is guaranteed
            to be updated; read it with :func:`eva_kernels.topk_eigh` or mirror it with
            :func:`eva_kernels.symmetrize_`.
        colsum: (d,) float32, contiguous.
        x: (n, d) float32 / float16 / bfloat16, any strides; read once, widened on the fly.
        mask: optional (n,) bool; rows with False are skipped (NaN/Inf in them is ignored).
        shift: optional (d,) float32 reference subtracted from every row before accumulation.
            Accumulating about a value near the data mean keeps fp32 accurate when a
            channel's mean dwarfs its spread (centring later then cancels no digits).
        backend: a name (``"auto"``, ``"torch"``, ``"triton"``, ``"cpp"``) or a resolved
            :class:`eva_kernels.Backend`; default ``EVA_BACKEND`` or auto. A named backend
            that cannot run here raises :class:`eva_kernels.BackendUnavailableError`.
        precision: ``"exact"`` (default; the contract above) or ``"fast"``: for 16-bit ``x``
            with a shift, one tensor-core product per pair with the shift taken out per chunk
            (error :data:`FAST_PRODUCT_ERROR`, about ``fast_error_estimate(R)`` of the largest
            entry). Backends without such a path (``torch``, ``cpp``) run the exact one.

    Returns:
        0-d int64 tensor on ``x.device``: the number of rows used (no host sync on GPU).
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"cov_update: precision must be 'exact' or 'fast', got {precision!r}")
    check_cov_update_args(cov, colsum, x, mask, shift)
    impl = resolve("cov_update", x.device, backend)
    run = impl.cov_update_fast if precision == "fast" and impl.cov_update_fast is not None else impl.cov_update
    return run(cov, colsum, x, mask, shift)


def symmetrize_(cov: Tensor) -> Tensor:
    """Mirror the upper triangle of square ``cov`` into its lower triangle, in place."""
    cov.copy_(sym_from_upper(cov))
    return cov


def symmetric_from_upper(cov: Tensor) -> Tensor:
    """The full symmetric matrix (a new (d, d) tensor) whose upper triangle ``cov`` holds: what
    ``cov_update`` accumulated, e.g. a GPTQ Hessian ``H = sum x^T x``, for a reader of the whole
    matrix (``cov`` itself is left as is; :func:`symmetrize_` does it in place)."""
    if not isinstance(cov, Tensor) or cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"symmetric_from_upper: cov must be a square (d, d) tensor, got {_describe(cov)}")
    return sym_from_upper(cov)
