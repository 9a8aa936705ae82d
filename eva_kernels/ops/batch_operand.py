"""The matrices of a :class:`eva_kernels.SubspaceBatch`, and how their products are computed.

Each matrix is a statistic ``C_g`` (d, d) known by its upper triangle, optionally centred
(``sym(C_g) - c_g c_g^T / n_g``). Two ways to multiply ``G`` of them by ``Q`` (G, d, b):

* ``"mirror"`` (:class:`MirroredStack`): the symmetric matrices are built once per batch into
  one (G, d, d) stack (a d x d copy per matrix, every time a batch is made, i.e. every streaming
  step), then ``torch.bmm``. Any dtype and device; the CPU path.
* ``"upper"`` (:class:`UpperInPlace`): one Triton launch per product reads each statistic's
  upper triangle where it lives, through a table of addresses
  (:func:`eva_kernels.backends.triton.upper_bmm.upper_bmm`); centring in the epilogue. No d x d
  copy at all: a product moves ``4 d^2`` bytes per fp32 matrix. fp32 contiguous statistics on
  CUDA (or CPU tensors under ``TRITON_INTERPRET=1``, how the tests run it).

``"auto"`` (:func:`resolve_products`) is ``"upper"`` on CUDA where Triton runs and the
statistics are fp32 contiguous, ``"mirror"`` elsewhere. When the Triton kernel cannot run on
this GPU (it fails to compile or launch), the batch falls back to ``"mirror"`` and records why
(:attr:`BatchOperand.fallback`); it never crashes for that.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

PRODUCTS = ("auto", "mirror", "upper")


def symmetric_stack(covs: Sequence[Tensor]) -> Tensor:
    """(G, d, d): each matrix's upper triangle mirrored into its lower one, in one pass over
    each matrix (one large copy kernel per matrix; no intermediate stack)."""
    d = covs[0].shape[-1]
    a = torch.empty((len(covs), d, d), dtype=covs[0].dtype, device=covs[0].device)
    upper = torch.ones(d, d, dtype=torch.bool, device=a.device).triu_()
    for i, c in enumerate(covs):
        torch.where(upper, c, c.mT, out=a[i])
    return a


def _upper_kernel():
    """The Triton module, or None where Triton cannot run here."""
    try:
        from ..backends.triton import upper_bmm
    except Exception:  # noqa: BLE001 - no Triton (or no usable one): the mirror path runs
        return None
    return upper_bmm


def resolve_products(products: str, covs: Sequence[Tensor]) -> str:
    """``products`` ("auto", "mirror", "upper") resolved for ``covs`` (see the module docstring)."""
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
    if products != "auto":
        return products
    if covs[0].device.type != "cuda":
        return "mirror"
    kernel = _upper_kernel()
    if kernel is None or not kernel.supports(covs):
        return "mirror"
    from ..backends.triton.config import why_not
    return "upper" if why_not("cuda") is None else "mirror"


def subtract_centring(y: Tensor, q: Tensor, c: Optional[Tensor], n: Optional[Tensor]) -> Tensor:
    """``y - c (c^T q) / n`` per matrix: y, q (G, d, b), c (G, d), n (G,)."""
    if c is None:
        return y
    ctq = torch.bmm(c.unsqueeze(1), q) / n.reshape(-1, 1, 1)
    return torch.baddbmm(y, c.unsqueeze(2), ctq, alpha=-1)


class BatchOperand:
    """``G`` statistics ready for repeated products; :meth:`select` keeps some of them."""

    #: "mirror" or "upper": the way that runs
    kind: str = ""
    #: why a requested "upper" runs as "mirror" (None: it did not fall back)
    fallback: Optional[str] = None

    def matmul(self, q: Tensor, c: Optional[Tensor], n: Optional[Tensor]) -> Tensor:
        """(G, d, b) ``(sym(C_g) - c_g c_g^T / n_g) Q_g`` (uncentred when ``c`` is None)."""
        raise NotImplementedError

    def select(self, keep: List[int], index: Tensor) -> "BatchOperand":
        """The operand of the matrices at positions ``keep``, also given as ``index``, a (k,) long
        tensor on the device (so that no device-to-host copy is needed)."""
        raise NotImplementedError


class MirroredStack(BatchOperand):
    """The symmetric matrices in one (G, d, d) stack, multiplied with ``torch.bmm``."""

    kind = "mirror"

    def __init__(self, covs: Optional[Sequence[Tensor]] = None, stack: Optional[Tensor] = None,
                 fallback: Optional[str] = None):
        self.a = symmetric_stack(covs) if stack is None else stack
        self.fallback = fallback

    def matmul(self, q: Tensor, c: Optional[Tensor], n: Optional[Tensor]) -> Tensor:
        return subtract_centring(torch.bmm(self.a, q), q, c, n)

    def select(self, keep: List[int], index: Tensor) -> "MirroredStack":
        return MirroredStack(stack=self.a.index_select(0, index), fallback=self.fallback)


class UpperInPlace(BatchOperand):
    """The statistics where they live, multiplied by the Triton upper-triangle kernel."""

    kind = "upper"

    def __init__(self, covs: Sequence[Tensor], addr: Optional[Tensor] = None):
        self.kernel = _upper_kernel()
        if self.kernel is None or not self.kernel.supports(covs):
            raise ValueError("products='upper' needs Triton and fp32 contiguous (d, d) statistics; "
                             "use products='mirror' (any dtype)")
        self.covs: List[Tensor] = list(covs)  # kept alive: the kernel reads them through their addresses
        self.d = covs[0].shape[0]
        self.addr = self.kernel.addresses(covs) if addr is None else addr

    def matmul(self, q: Tensor, c: Optional[Tensor], n: Optional[Tensor]) -> Tensor:
        return self.kernel.upper_bmm(self.addr, self.d, q, c, n)

    def select(self, keep: List[int], index: Tensor) -> "UpperInPlace":
        return UpperInPlace([self.covs[i] for i in keep], self.addr.index_select(0, index))


def batch_operand(covs: Sequence[Tensor], products: str = "auto") -> BatchOperand:
    """The operand of ``covs`` for ``products`` (resolved by :func:`resolve_products`)."""
    if resolve_products(products, covs) == "upper":
        return UpperInPlace(covs)
    return MirroredStack(covs)
