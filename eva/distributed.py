"""torch.distributed helpers: statistics stay on their rank; only sketches travel.

Each rank accumulates the statistic of its own tokens, ``C_r``. The global statistic is
``C = sum_r C_r``, and a solve needs only products with it, so the ranks sum products instead
of matrices (:func:`eva_kernels.topk_eigh`'s ``reduce``): per subspace iteration ``C Q =
sum_r C_r Q`` (d x b), plus once per solve the column sums, the diagonal (for the variance
terms) and the token count (:func:`reduced_vectors`). Every rank then holds the same reduced
products, computes the same basis, and takes the same convergence decisions in lockstep; no
``d x d`` matrix is ever communicated. The shift is the global mean of the first batch, agreed
with one all-reduce inside the first forward.

:class:`Traffic` counts what this rank all-reduces (bytes per step, in total) and the time
spent in collectives; the run's metadata reports it.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor


_warned_no_group = False


def active(gather_distributed_inputs: bool) -> bool:
    """True when the run sums statistics over the ranks of an initialised process group.

    ``gather_distributed_inputs=True`` (PEFT's default) without a process group runs on one
    process; when the environment says this process is one of several (``WORLD_SIZE > 1``, as
    ``torchrun`` sets it), that is almost surely a mistake, and a warning says so, once.
    """
    global _warned_no_group
    if not gather_distributed_inputs:
        return False
    if dist.is_available() and dist.is_initialized():
        return True
    if not _warned_no_group and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        _warned_no_group = True
        warnings.warn(f"EVA: WORLD_SIZE={os.environ['WORLD_SIZE']} but torch.distributed is not initialised, so this "
                      "process runs EVA alone on its own data; call torch.distributed.init_process_group() first "
                      "to combine the ranks (or pass gather_distributed_inputs=False to silence this)")
    return False


class Traffic:
    """This rank's collectives in one run: bytes per step (``step`` is set by the engine), in
    total, number of calls and seconds spent waiting in them (wall clock)."""

    def __init__(self):
        self.step = 0
        self.bytes_total = 0
        self.calls = 0
        self.seconds = 0.0
        self.bytes_per_step: Dict[int, int] = {}

    def all_reduce(self, t: Tensor, op=None) -> Tensor:
        """In-place ``dist.all_reduce`` (sum unless ``op``), counted; returns ``t``."""
        t0 = time.perf_counter()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
        self.seconds += time.perf_counter() - t0
        n = t.numel() * t.element_size()
        self.bytes_total += n
        self.calls += 1
        self.bytes_per_step[self.step] = self.bytes_per_step.get(self.step, 0) + n
        return t

    def summary(self, steps: int, full_statistics_bytes: int) -> dict:
        """The metadata record: bytes per step (steps 1..``steps``: the batch's forward, its
        solves and the loader check), of the final solves (``step == -1``), in total; calls and
        seconds; and what all-reducing every group's full ``d x d`` fp32 statistic would move per
        step (``full_statistics_bytes``)."""
        return {"bytes_total": self.bytes_total, "calls": self.calls, "collective_seconds": self.seconds,
                "bytes_per_step": [self.bytes_per_step.get(s, 0) for s in range(1, steps + 1)],
                "bytes_final_solves": self.bytes_per_step.get(-1, 0),
                "full_statistics_bytes_per_step": full_statistics_bytes}


def masked_sum_and_count(x: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``(sum of the kept rows (d,) fp32, kept-row count 0-d fp32)`` of ``x`` (n, d); no host sync.

    Dropped rows are removed with a select, so NaN/Inf in them cannot leak into the sum.
    """
    xf = x.to(torch.float32)
    if mask is None:
        return xf.sum(0), torch.tensor(float(x.shape[0]), device=x.device)
    return torch.where(mask.unsqueeze(1), xf, xf.new_zeros(())).sum(0), mask.sum().to(torch.float32)


def global_mean(x: Tensor, mask: Optional[Tensor], traffic: Traffic) -> Tensor:
    """Mean of the kept rows over every rank (one all-reduce of the sum and the count)."""
    total, n = masked_sum_and_count(x, mask)
    s = torch.cat([total, n.reshape(1)])
    traffic.all_reduce(s)
    return s[:-1] / s[-1].clamp_min(1)


def reduced_vectors(colsum: Tensor, count: Tensor, diag: Tensor, traffic: Traffic) -> Tuple[Tensor, Tensor, Tensor]:
    """``(colsum, count, diag)`` summed over ranks in one all-reduce, into new tensors.

    Shapes: colsum and diag (..., d), count (...): one group, or G groups stacked. float64 on
    the wire: it carries token counts exactly up to 2**53 (float32 only to 2**24). Returns
    colsum fp32, count int64, diag fp32 (of the summed statistic), in the input shapes.
    """
    n = colsum.numel()
    v = torch.cat([colsum.to(torch.float64).reshape(-1), diag.to(torch.float64).reshape(-1),
                   count.to(torch.float64).reshape(-1)])
    traffic.all_reduce(v)
    return (v[:n].to(torch.float32).reshape(colsum.shape).contiguous(), v[2 * n:].round().to(torch.int64).reshape(count.shape),
            v[n:2 * n].to(torch.float32).reshape(diag.shape))


def collective_device() -> torch.device:
    """Where small collectives' tensors live: the current CUDA device under NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool, device: torch.device, traffic: Traffic) -> bool:
    """True on every rank when ``flag`` is true on any rank (one all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    traffic.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def unwrap_data_parallel(model):
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (hooks and names then
    refer to the model itself: ``layers.0...``, not ``module.layers.0...``); other models as is.

    EVA's forwards run under ``no_grad`` in eval mode, where the wrapper adds nothing but its
    own collectives; FSDP2 (``fully_shard``) keeps the model's class and names and is used as is.
    """
    from torch.nn import DataParallel
    from torch.nn.parallel import DistributedDataParallel
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def _first_difference(a, b, path: str = "") -> str:
    """Where two plain structures (dicts, lists, scalars) first differ, as ``path: a vs b``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
        if len(a) != len(b):
            return f"{path}: {len(b)} entries vs {len(a)}"
    return f"{path}: {b!r} vs {a!r}"


def check_ranks_agree(fingerprint: dict) -> None:
    """Raise on every rank, naming the first difference, unless every rank passes an equal
    ``fingerprint`` (target layers and widths, EVA settings, engine options): one
    ``all_gather_object`` before the first forward, so that a mismatch cannot hang a collective."""
    from .errors import EvaError
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, fingerprint)
    for rank, other in enumerate(gathered):
        if other != gathered[0]:
            raise EvaError(f"ranks disagree before EVA's first forward: rank {rank} vs rank 0 differ in "
                           f"{_first_difference(gathered[0], other)}; run the same model, target_modules, EVA "
                           "config and options on every rank")


def agreed_min(value: int, device: torch.device, traffic: Traffic) -> int:
    """The smallest of the ranks' ``value`` (e.g. an ``"auto"`` memory budget: free memory differs)."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    traffic.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def ranks_with_data(has_batch: bool, device: torch.device, traffic: Traffic) -> list:
    """Which ranks have a batch this step (one all-reduce of a one-hot vector)."""
    flags = torch.zeros(dist.get_world_size(), dtype=torch.float32, device=device)
    flags[dist.get_rank()] = 1.0 if has_batch else 0.0
    traffic.all_reduce(flags)
    return [r for r, f in enumerate(flags.tolist()) if f > 0]
