"""Running activation statistics of one shared-input group, and its eigen-estimate.

State (on the activations' device)::

    cov    (d, d) fp32   sum (x - s)^T (x - s)   (upper triangle authoritative)
    colsum (d,)   fp32   sum (x - s)
    count  ()     int64  number of tokens
    shift  (d,)   fp32   s: the mean of the first batch's kept tokens (centred mode), else 0

The centred scatter matrix is ``cov - colsum colsum^T / count`` (exact for any fixed s;
accumulating about s ~ mean keeps fp32 accurate for channels with a large mean). Its
eigenvectors are the right-singular vectors of the centred token matrix: PCA of every
token consumed. Uncentred mode uses s = 0 and no correction.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

import eva_kernels
from eva_kernels.transfer import from_values

from ..distributed import Traffic, global_mean, masked_sum_and_count
from . import precision as _precision
from .variance_floor import resolution

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


class RunningStats:
    """``cov``/``colsum``/``count``/``shift`` of one group (see the module docstring).

    ``backend`` is the resolved :class:`eva_kernels.Backend` of ``cov_update`` (resolved once
    per run and device by the engine). ``traffic``: a distributed run's
    :class:`eva.distributed.Traffic` (the shift is then the mean over all ranks); None: one process.
    ``precision``: ``EvaOptions.statistics_precision`` (:mod:`eva.engine.precision`); the path
    in use is :attr:`path`, updated by :meth:`observe_ratio` after each solve; :attr:`batches`
    counts the batches each path accumulated.
    """

    def __init__(self, d: int, device: torch.device, centered: bool, backend: eva_kernels.Backend,
                 traffic: Optional[Traffic] = None, name: str = "", precision: str = "exact"):
        self.name = name  # the group's leader layer (for messages and inspection)
        self.d = d
        self.traffic = traffic
        self.distributed = traffic is not None
        self.centered = centered
        self.backend = backend
        self.device = torch.device(device)
        self.cov = torch.zeros(d, d, dtype=torch.float32, device=device)
        self.colsum = torch.zeros(d, dtype=torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.shift: Optional[Tensor] = None
        self.input_roundoff = 0.0  # unit roundoff of the coarsest input dtype seen (host, no sync)
        self.precision = precision
        self.path = _precision.initial(precision)
        self.batches = {"exact": 0, "fast": 0}
        self.max_ratio: Optional[float] = None  # the largest R measured (host, after syncs)
        self.fast_ratio: Optional[float] = None  # the largest R measured while on the fast path

    def _init_shift(self, x: Tensor, mask: Optional[Tensor]) -> None:
        if not self.centered:
            self.shift = None
            return
        if self.distributed:
            self.shift = torch.nan_to_num(global_mean(x, mask, self.traffic), nan=0.0, posinf=0.0, neginf=0.0)
            return
        if mask is None:
            xf = x.to(torch.float32)
            self.shift = xf.mean(0) if x.shape[0] else xf.new_zeros(self.d)
        else:
            total, kept = masked_sum_and_count(x, mask)
            self.shift = total / kept.clamp_min(1)
        # a NaN/Inf in the first batch must not poison every later batch through the shift;
        # the finiteness check on colsum reports it.
        self.shift = torch.nan_to_num(self.shift, nan=0.0, posinf=0.0, neginf=0.0).contiguous()

    def update(self, x: Tensor, mask: Optional[Tensor]) -> None:
        """Accumulate rows ``x`` (N, d) (kept where ``mask``); no host sync."""
        if self.shift is None and self.centered:
            self._init_shift(x, mask)
        self.input_roundoff = max(self.input_roundoff, torch.finfo(x.dtype).eps / 2)
        fast = (self.path == "fast" and x.dtype in _SIXTEEN_BIT and self.shift is not None
                and self.backend.cov_update_fast is not None)
        self.batches["fast" if fast else "exact"] += 1
        n = eva_kernels.cov_update(self.cov, self.colsum, x, mask, shift=self.shift, backend=self.backend,
                                   precision="fast" if fast else "exact")
        self.count += n

    def observe_ratio(self, ratio: float) -> None:
        """Record ``R`` of the statistics so far (host float) and choose the next batches' path."""
        self.max_ratio = ratio if self.max_ratio is None else max(self.max_ratio, ratio)
        if self.batches["fast"]:
            self.fast_ratio = ratio if self.fast_ratio is None else max(self.fast_ratio, ratio)
        self.path = _precision.route(self.precision, ratio)

    @property
    def nbytes(self) -> int:
        """Bytes of this group's live statistic (cov, colsum, count and shift)."""
        return sum(t.numel() * t.element_size() for t in (self.cov, self.colsum, self.count, self.shift)
                   if t is not None)

    @property
    def live(self) -> bool:
        """False once :meth:`release` freed the tensors."""
        return self.cov is not None

    def release(self) -> int:
        """Free ``cov``, ``colsum``, ``count`` and ``shift`` (layer-sequential runs, after the
        group's final solve); scalars such as ``input_roundoff`` stay. Returns the bytes freed."""
        freed = self.nbytes
        self.cov = self.colsum = self.count = self.shift = None
        return freed

    # -- views used by the solver -------------------------------------------------------------
    def centring(self, colsum: Tensor, count: Tensor):
        """(colsum, count) arguments of ``topk_eigh`` for the chosen mode."""
        return (colsum, count) if self.centered else (None, None)

    def variance_terms(self, diag: Tensor, colsum: Tensor, count: Tensor) -> Tensor:
        """(3,) float64 ``[V, S, F]`` for the zero-variance test (no sync; see :mod:`eva.engine.variance_floor`).

        ``S = trace(cov) = sum ||x_i - s||^2`` (what was accumulated about the shift ``s``),
        ``V = S - ||colsum||^2 / n`` the total variance (centred mode; ``V = S`` uncentred),
        ``F`` the number of features whose variance exceeds the rounding of their own elements.
        ``diag`` (d,) is the diagonal of ``cov``; ``diag``/``colsum``/``count`` may be the
        rank-summed ones of a distributed run.
        """
        return variance_terms_batched(self.centered, diag[None], colsum[None], count.reshape(1),
                                      None if self.shift is None else self.shift[None],
                                      [resolution(self.input_roundoff)])[0]


def variance_terms_batched(centered: bool, diag: Tensor, colsum: Tensor, count: Tensor,
                           shift: Optional[Tensor], resolutions: Sequence[float]) -> Tensor:
    """(G, 3) float64 ``[V, S, F]`` of G groups of one mode and width in one set of launches.

    diag (G, d): the diagonals of the groups' ``cov``; colsum (G, d); count (G,); shift (G, d)
    or None (uncentred, or no shift); ``resolutions`` (G,) host floats: each group's relative
    rounding floor (:func:`eva.engine.variance_floor.resolution`). Per feature ``j``:
    ``V_j = diag_j - colsum_j^2 / n`` (centred; ``diag_j`` uncentred) and the raw energy
    ``R_j = diag_j + 2 s_j colsum_j + n s_j^2 = sum_i x_ij^2``; ``F = #{j: V_j > resolution R_j}``.
    """
    acc = diag.to(torch.float64)
    var, raw = acc, acc
    if centered:
        c = colsum.to(torch.float64)
        n = count.to(torch.float64).clamp_min(1)[:, None]
        var = acc - c * c / n
        if shift is not None:
            sh = shift.to(torch.float64)
            raw = acc + 2 * sh * c + n * sh * sh
    res = list(resolutions)
    if len(set(res)) == 1:  # the usual case: a Python scalar, no host-to-device copy
        floor = res[0] * raw
    else:
        floor = from_values(res, torch.float64, acc.device)[:, None] * raw  # no host sync on CUDA
    above = (var > floor).sum(-1).to(torch.float64)
    return torch.stack([var.sum(-1), acc.sum(-1), above], dim=-1)
