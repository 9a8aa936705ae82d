"""``eva init`` / ``eva demo`` under ``torchrun``: one process per rank, one result.

``torchrun --nproc-per-node N [--nnodes M ...] -m eva init ...`` starts ``N x M`` processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment. :func:`ranks` then initialises
the default process group (NCCL when the run's device is CUDA, gloo otherwise), gives each
process the GPU of its ``LOCAL_RANK`` (so nothing assumes one node), and destroys the group at
the end. The calibration lines are dealt round-robin (:meth:`Ranks.shard`: every line, hence
every token, is used once); every rank computes; only rank 0 prints, writes the
``.safetensors`` file and the plot. The engine sums each step's products over the ranks and
shows its progress bar on rank 0, where the token counts (and so tokens/s) are global.
Without ``WORLD_SIZE > 1`` it is a single process, as before.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import List

#: How long a collective may wait for the other ranks before the run fails instead of hanging.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, lines: List[str]) -> List[str]:
        """This rank's lines: every ``world``-th, starting at ``rank``."""
        return lines[self.rank::self.world]

    def device(self, device: str) -> str:
        """``cuda`` becomes this process's GPU (``cuda:LOCAL_RANK``) in a multi-process run."""
        return f"cuda:{self.local_rank}" if self.world > 1 and device == "cuda" else device


def launched_world() -> int:
    """``WORLD_SIZE`` from the environment (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


@contextmanager
def ranks(device: str):
    """Yield :class:`Ranks`; with ``WORLD_SIZE > 1`` inside an initialised process group."""
    import torch
    import torch.distributed as dist
    world = launched_world()
    if world <= 1 or dist.is_initialized():
        yield Ranks(dist.get_rank() if dist.is_initialized() else 0,
                    dist.get_world_size() if dist.is_initialized() else 1)
        return
    me = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = me.device(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(me.device(device)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield me
    finally:
        dist.destroy_process_group()
