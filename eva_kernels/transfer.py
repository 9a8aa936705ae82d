"""Host-to-device copies that do not synchronise the host with the device.

A copy from ordinary (pageable) host memory to a CUDA tensor with ``non_blocking=False``, which
is what ``torch.tensor(values, device="cuda")`` and ``cpu_tensor.to("cuda")`` do, ends with a
stream synchronisation: the host waits for every kernel queued before it. In a solver step that
is a hidden sync per small table (addresses, indices, a round's Ritz coefficients). From pinned
memory with ``non_blocking=True`` the copy is queued like a kernel instead (PyTorch's caching
host allocator keeps the pinned buffer alive until the copy has run).

Elsewhere (CPU, or no CUDA) these are the plain copies.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor


def to_device(host: Tensor, device: Union[str, torch.device]) -> Tensor:
    """``host`` (a CPU tensor) on ``device``; on CUDA through pinned memory, without a host sync."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def from_values(values: Sequence, dtype: torch.dtype, device: Union[str, torch.device]) -> Tensor:
    """A 1-d tensor of Python ``values`` on ``device`` (see :func:`to_device`)."""
    return to_device(torch.tensor(list(values), dtype=dtype), device)
