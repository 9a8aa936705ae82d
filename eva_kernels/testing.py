"""float64 specifications and comparison helpers, shared by the tests and the benches.

Slow and simple on purpose: these are the spec every backend is checked against.

* :func:`cov_update_spec` — ``cov_update`` in float64 (boolean indexing, then the shift).
* :func:`cov_update_fast_reference` — the arithmetic of ``cov_update(precision="fast")`` in
  plain PyTorch fp32 (raw products per chunk, then the shift correction), to run the engine's
  fast path where no Triton kernel runs (CPU tests) and to check that path's error model.
* :func:`covariance_spec` — the (centred) scatter matrix of the kept rows.
* :func:`exact_pca` — top principal directions of a token matrix by float64 SVD: what the
  engine's components must span.
* :func:`assert_close` — ``torch.testing.assert_close`` against a float64 spec, with the
  tolerance scaled to the spec's magnitude (the accumulation's rounding is relative to it).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


def _kept_rows(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    y = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    if mask is not None:
        y = y[mask.reshape(-1).to(torch.bool)]
    return y


def cov_update_spec(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None) -> int:
    """float64 ``cov_update``: ``cov`` (d, d) and ``colsum`` (d,) float64, updated in place.

    Returns the number of kept rows (a Python int).
    """
    y = _kept_rows(x, mask)
    if shift is not None:
        y = y - shift.to(torch.float64)
    cov += y.mT @ y
    colsum += y.sum(0)
    return int(y.shape[0])


def cov_update_fast_reference(cov: Tensor, colsum: Tensor, x: Tensor, mask: Optional[Tensor] = None,
                              shift: Optional[Tensor] = None, chunk: Optional[int] = None) -> Tensor:
    """``cov_update(..., precision="fast")`` as the Triton kernel computes it, in fp32 on any device.

    Same arguments and return as the backends' ``cov_update`` (``cov`` (d, d) and ``colsum``
    (d,) fp32 updated in place, whole matrix; returns the 0-d int64 kept count). For 16-bit
    ``x`` with a shift, per chunk of ``chunk`` consecutive rows (default
    :data:`eva_kernels.ops.cov_update.FAST_CHUNK_ROWS`), with ``u`` the chunk's
    ``sum (x - s)`` and ``c`` its kept rows::

        acc += float32(x)^T float32(x)              (exact products, fp32 sums)
        acc -= s z^T + z s^T,  z = u + (c / 2) s    (the shift's correction)

    and finally ``cov += acc``. Other inputs: the exact fp32 update. Not a spec (that is
    :func:`cov_update_spec`): a reference of the fast path's rounding, for tests.
    """
    from .ops.cov_update import FAST_CHUNK_ROWS
    chunk = chunk or FAST_CHUNK_ROWS
    keep = (torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if mask is None
            else mask.to(torch.bool))
    if shift is None or x.dtype not in (torch.float16, torch.bfloat16):
        y = x[keep].to(torch.float32) - (0 if shift is None else shift)
        cov += y.mT @ y
        colsum += y.sum(0)
        return keep.sum()
    acc = torch.zeros_like(cov)
    for c0 in range(0, x.shape[0], chunk):
        rows = x[c0:c0 + chunk][keep[c0:c0 + chunk]].to(torch.float32)
        u = (rows - shift).sum(0)
        z = u + (0.5 * rows.shape[0]) * shift
        acc += rows.mT @ rows
        acc -= shift[:, None] * z[None, :] + z[:, None] * shift[None, :]
        colsum += u
    cov += acc
    return keep.sum()


def covariance_spec(x: Tensor, mask: Optional[Tensor] = None, centered: bool = True) -> Tensor:
    """float64 scatter matrix of the kept rows: ``sum (x_i - mu)^T (x_i - mu)`` (or uncentred)."""
    y = _kept_rows(x, mask)
    if centered:
        y = y - y.mean(0, keepdim=True)
    return y.mT @ y


def exact_pca(rows: Sequence[Tensor], k: int, centered: bool = True) -> Tuple[Tensor, Tensor, int]:
    """Exact PCA of the concatenated token rows (each (n_i, d)) by float64 SVD.

    Returns ``(singular_values (all), components (k, d), tokens)``: the right-singular vectors
    of the (centred) token matrix are the top eigenvectors of its scatter matrix.
    """
    y = torch.cat([r.detach().to(torch.float64) for r in rows])
    if centered:
        y = y - y.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(y, full_matrices=False)
    return s, vh[:k], int(y.shape[0])


def assert_close(actual: Tensor, spec: Tensor, *, rtol: float, atol_scale: float = 1e-6, msg: str = "") -> None:
    """``actual`` equals the float64 ``spec`` up to ``rtol`` and ``atol_scale * max|spec|``."""
    spec = spec.to(torch.float64)
    scale = float(spec.abs().max()) if spec.numel() else 0.0
    torch.testing.assert_close(actual.detach().to(torch.float64).cpu(), spec.cpu(), rtol=rtol,
                               atol=atol_scale * max(scale, 1.0), msg=(lambda m: f"{msg}: {m}") if msg else None)
