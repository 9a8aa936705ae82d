"""How much the statistics may hold, and which groups are calibrated together under that bound.

The statistic of a shared-input group of width ``d`` (:class:`eva.engine.statistics.RunningStats`)
holds ``cov`` (d, d) fp32, ``colsum`` and, centred, ``shift`` (d,) fp32, and ``count`` (int64):
:func:`statistic_bytes`. A run with ``memory_budget`` set is all-at-once when every group fits
at once, else layer-sequential (:mod:`eva.engine.sequential`), calibrating the groups a
*window* at a time: :func:`plan_windows` packs consecutive groups, in block order, greedily.

* ``"auto"``: :data:`AUTO_FRACTION` of the free memory of the statistics' device (CUDA:
  ``torch.cuda.mem_get_info``; CPU: ``MemAvailable`` of ``/proc/meminfo``), the rest left to the
  forward's activations and the eigensolver's workspace.
* The budget bounds the statistics only. Outside it: the block inputs cached on
  ``offload_device``, one block's activations, and the eigensolver's temporaries (on the torch
  backend one symmetric ``d x d`` copy per solve; batched solves: ``solve_batch_bytes``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..errors import EvaError
from ..sizes import format_bytes

#: Share of the free memory that ``memory_budget="auto"`` gives the statistics.
AUTO_FRACTION = 0.5


def statistic_bytes(d: int, centered: bool) -> int:
    """Bytes of one group's statistic of width ``d`` (equal to ``RunningStats.nbytes``)."""
    return 4 * d * d + 4 * d * (2 if centered else 1) + 8


def free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` in bytes (CUDA: driver's free memory; CPU: available RAM)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def resolve_budget(option, device: Optional[torch.device]) -> Optional[int]:
    """``EvaOptions.memory_budget`` in bytes (None: unbounded); ``"auto"`` reads ``device``'s free memory."""
    if option is None:
        return None
    if option == "auto":
        return int(AUTO_FRACTION * free_bytes(device if device is not None else torch.device("cpu")))
    return int(option)


def check_budget_floor(targets: Sequence, budget: int, centered: bool) -> None:
    """Raise, before any forward, when a target's statistic alone exceeds ``budget``.

    Every target's group has the target's width, so the largest target statistic is the
    smallest budget with which any run can work.
    """
    widest = max(targets, key=lambda t: t.in_features)
    need = statistic_bytes(widest.in_features, centered)
    if budget < need:
        d = widest.in_features
        raise EvaError(f"memory_budget of {budget} bytes ({format_bytes(budget)}) is smaller than the statistic of "
                       f"layer {widest.name} (and of the layers sharing its input): {d} x {d} fp32 plus its "
                       f"vectors, {need} bytes ({format_bytes(need)}); the smallest budget that works is "
                       f"memory_budget={need}, or leave memory_budget unset")


def fits_at_once(widths: Sequence[int], budget: int, centered: bool) -> bool:
    """Whether statistics of these widths fit in ``budget`` together."""
    return sum(statistic_bytes(d, centered) for d in widths) <= budget


@dataclass
class Window:
    """Groups calibrated together: ``groups`` (in block order), the blocks they sit in
    (``first_block`` .. ``last_block``) and their statistics' bytes."""

    groups: list
    first_block: int
    last_block: int
    nbytes: int


def plan_windows(groups: Sequence, block_of: Sequence[int], budget: int, centered: bool) -> List[Window]:
    """Pack ``groups`` into consecutive windows whose statistics fit in ``budget``.

    Whole blocks are packed greedily in order (as many as fit); a block whose groups alone exceed
    the budget gets windows of its own, its groups packed greedily in discovery order (each such
    window replays the block). ``block_of[i]``: the block of ``groups[i]``.
    """
    by_block: dict = {}
    for i, g in enumerate(groups):
        by_block.setdefault(block_of[i], []).append(g)
    windows: List[Window] = []
    open_window = False  # whether windows[-1] may take the next whole block
    for b in sorted(by_block):
        members = by_block[b]
        sizes = [statistic_bytes(g.d, centered) for g in members]
        total = sum(sizes)
        if total <= budget:
            if open_window and windows[-1].nbytes + total <= budget:
                w = windows[-1]
                w.groups.extend(members)
                w.last_block, w.nbytes = b, w.nbytes + total
            else:
                windows.append(Window(list(members), b, b, total))
            open_window = True
            continue
        open_window = False
        for g, n in zip(members, sizes):
            if windows and windows[-1].first_block == b and windows[-1].nbytes + n <= budget:
                windows[-1].groups.append(g)
                windows[-1].nbytes += n
            else:
                windows.append(Window([g], b, b, n))
    return windows
