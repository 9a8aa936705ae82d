"""CorDA's per-layer input covariances, accumulated with ``eva_kernels.cov_update``.

PEFT's CorDA (``peft.tuners.lora.corda.calib_cov_distribution``) hooks every target layer and, per
call, scales the input by ``|max(x)|`` (the largest *signed* entry's magnitude: PEFT's
``input / torch.max(input).abs()``), multiplies ``x^T x`` in full fp32, checks it for NaN/Inf
with two host syncs, and adds it into the layer's matrix; at the end it divides by the number of
calls. This module computes the same matrices:

* per call ``C += (x / s)^T (x / s)``, ``s = |max(x)|`` kept on the device (no sync), through
  ``cov_update`` (upper triangle, fp32 accumulation, 16-bit inputs widened on the fly);
* layers fed the very same input tensor (q/k/v, gate/up) share one statistic: the first call
  of each layer compares its input with the other layers' latest ones by identity;
* one finiteness check per layer at the end (a NaN/Inf input raises naming the layer, before
  any adapter or module field changes);
* ``C / calls`` handed back as the full symmetric matrix, what PEFT's decomposition reads.

Shapes: a layer's input ``(..., d)`` is flattened to ``(tokens, d)``; ``C`` is ``(d, d)`` fp32.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

import eva_kernels

from ..errors import EvaError


class _Statistic:
    """``cov`` (d, d) fp32 (upper triangle), ``colsum`` (d,) (unused by CorDA) and the calls."""

    def __init__(self, d: int, device: torch.device):
        self.cov = torch.zeros(d, d, dtype=torch.float32, device=device)
        self.colsum = torch.zeros(d, dtype=torch.float32, device=device)
        self.calls = 0
        self.last_input: Optional[weakref.ref] = None


class CovarianceHooks:
    """Forward hooks on ``modules`` (name -> module) accumulating CorDA's scaled covariances.

    ``share_inputs``: layers whose first call receives the same tensor object as another
    layer's latest call share its statistic (and must keep doing so: a later call with another
    input raises, naming both). ``backend``: the ``cov_update`` backend (None: auto).
    """

    def __init__(self, modules: Dict[str, nn.Module], share_inputs: bool = True, backend=None):
        self.modules = modules
        self.share_inputs = share_inputs
        self.backend = backend
        self.stats: Dict[str, _Statistic] = {}       # leader name -> statistic
        self.leader: Dict[str, str] = {}             # layer -> leader name
        self.calls: Dict[str, int] = {n: 0 for n in modules}
        self._handles: List = []

    def __enter__(self) -> "CovarianceHooks":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, name: str):
        def hook(module, args, output):
            self._accumulate(name, args[0])
        return hook

    def _accumulate(self, name: str, x: Tensor) -> None:
        self.calls[name] += 1
        if name not in self.leader:
            self.leader[name] = self._find_leader(name, x)
        lead = self.leader[name]
        if lead != name:  # a follower: its leader already accumulated this very tensor
            stat = self.stats[lead]
            if stat.last_input is None or stat.last_input() is not x:
                raise EvaError(f"CorDA: layer {name} received the same input as {lead} in its first call but not "
                               f"in call {self.calls[name]}; pass share_inputs=False")
            return
        if not isinstance(x, Tensor) or x.dim() < 1 or not x.is_floating_point():
            raise EvaError(f"CorDA: layer {name}'s input must be a floating-point tensor, got "
                           f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
        rows = x.detach().reshape(-1, x.shape[-1])
        stat = self.stats.get(name)
        if stat is None:
            stat = self.stats[name] = _Statistic(rows.shape[1], rows.device)
        scaled = rows.to(torch.float32) / rows.max().abs().to(torch.float32)  # PEFT's input / max(input).abs()
        eva_kernels.cov_update(stat.cov, stat.colsum, scaled, backend=self.backend)
        stat.calls += 1
        stat.last_input = weakref.ref(x)

    def _find_leader(self, name: str, x: Tensor) -> str:
        if self.share_inputs:
            for lead, stat in self.stats.items():
                if stat.last_input is not None and stat.last_input() is x:
                    return lead
        return name

    def covariances(self) -> Dict[str, Tensor]:
        """Layer -> ``C / calls`` (d, d) fp32, full symmetric; raises naming a layer that was
        never called, whose calls differ from its leader's, or whose inputs held NaN/Inf."""
        out = {}
        for name in self.modules:
            if self.calls[name] == 0:
                raise EvaError(f"CorDA: layer {name} was never called by run_model; check that run_model runs the "
                               "model (the hooked one) on the calibration data, or leave the layer out of "
                               "target_modules")
            lead = self.leader[name]
            stat = self.stats[lead]
            if self.calls[name] != stat.calls:
                raise EvaError(f"CorDA: layer {name} shares {lead}'s input but was called {self.calls[name]} times "
                               f"against {stat.calls}; pass share_inputs=False")
            if lead == name and not bool(torch.isfinite(torch.diagonal(stat.cov)).all()):
                raise EvaError(f"CorDA: invalid value (NaN/Inf) in the inputs of layer {name}; check the "
                               "calibration data and the model's outputs before it")
            out[name] = eva_kernels.symmetric_from_upper(stat.cov) / stat.calls
        return out
