"""Counting the kernel launches and host synchronisations a piece of code would cost on a GPU,
on any device (a CPU included), with a ``TorchDispatchMode``.

Every ATen op dispatched is one launch on a GPU, except views and metadata ops (no kernel).
Host synchronisations are the ops that make the host wait for the device:

* ``_local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``);
* ``nonzero`` / ``masked_select`` / ``unique`` and the like (their output size depends on data);
* ``linalg_eigh`` / ``linalg_svd`` / ``linalg_eig`` (cuSOLVER's paths synchronise; for ``eigh``
  beyond n = 32, once per matrix);
* a copy to the CPU (``.cpu()``, ``.to("cpu", copy=True)``). On a CPU tensor ``.cpu()`` is no
  op at all and ``.tolist()`` dispatches nothing, so code meant to be counted reads its results
  with ``.to("cpu", copy=True)`` (as :func:`eva_kernels.solve_batches` does).

Work on host copies, marked with :func:`eva_kernels.ops.subspace_batch.on_host` (the small
eigenproblems solved on the host), is neither a launch nor a sync and is not counted.

    with LaunchCounter() as count:
        run()
    count.ops, count.syncs, count.by_op
"""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .ops.subspace_batch import computing_on_host

#: ops that launch no kernel (views and metadata)
_NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "expand", "as_strided", "slice", "select", "t", "transpose", "permute",
    "unsqueeze", "squeeze", "diagonal", "alias", "detach", "unbind", "split", "split_with_sizes", "chunk",
    "narrow", "view_as", "expand_as", "lift_fresh", "_reshape_alias", "unfold", "flip_view", "conj", "_conj",
    "resolve_conj", "resolve_neg", "_neg_view", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size", "set_", "empty_like_view", "mT", "_nested_view_from_buffer", "real", "imag",
}
#: ops that make the host wait for the device
_SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
          "_linalg_eigh", "linalg_eigh", "_linalg_svd", "linalg_svd", "linalg_eig", "repeat_interleave"}


class LaunchCounter(TorchDispatchMode):
    """Counts dispatched ops (``ops``: the would-be GPU launches), host synchronisations
    (``syncs``) and ``by_op`` (name -> count) inside its ``with`` block; see the module docstring."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.by_op = collections.Counter()
        self.sync_ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name not in _NO_KERNEL and not computing_on_host():
            self.ops += 1
            self.by_op[name] += 1
            if name in _SYNCS or _copies_to_host(name, args, kwargs):
                self.syncs += 1
                self.sync_ops[name] += 1
        return func(*args, **kwargs)


def _copies_to_host(name: str, args, kwargs) -> bool:
    """``_to_copy`` / ``copy_`` whose destination is the CPU (a device-to-host transfer on a GPU)."""
    if name == "_to_copy":
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu"
    if name == "copy_" and args and isinstance(args[0], torch.Tensor):
        return args[0].device.type == "cpu" and isinstance(args[1], torch.Tensor) and args[1].device.type != "cpu"
    return False
