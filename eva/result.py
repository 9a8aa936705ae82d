"""The result of an EVA run: a PEFT-style state dict that also carries metadata.

:class:`EvaStateDict` is a plain ``dict`` (module name -> (rank, in_features) fp32 tensor, as
PEFT returns) with a ``metadata`` attribute: per-layer ranks, explained variance ratios,
tokens, steps, convergence, and the run's settings and timings. ``save``/``load_eva_state_dict``
write and read one ``.safetensors`` file whose header holds the metadata as JSON.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch

_META_KEY = "eva_metadata"


class EvaStateDict(dict):
    """``{module name: lora_A init (rank, in_features)}`` plus ``.metadata``."""

    def __init__(self, *args, metadata: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.metadata: Dict[str, Any] = metadata or {}

    @property
    def ranks(self) -> Dict[str, int]:
        return {k: int(v.shape[0]) for k, v in self.items()}

    def summary(self) -> str:
        """Human-readable table: layer, rank, top explained variance ratio, tokens, steps."""
        layers = self.metadata.get("layers", {})
        width = max([len(k) for k in self] + [5])
        lines = [f"{'layer':<{width}}  rank  evr[0]   tokens  steps  converged"]
        for name, w in self.items():
            info = layers.get(name, {})
            evr = info.get("explained_variance_ratio") or [float("nan")]
            lines.append(f"{name:<{width}}  {w.shape[0]:>4}  {evr[0]:.4f}  {info.get('tokens', 0):>7}  "
                         f"{info.get('steps', 0):>5}  {info.get('converged', '?')}")
        run = self.metadata.get("run", {})
        if run:
            lines.append(f"total rank {sum(self.ranks.values())} (budget {run.get('rank_budget')}), "
                         f"{run.get('steps')} batches, {run.get('seconds', 0):.2f} s")
        return "\n".join(lines)

    def save(self, path: str) -> str:
        """Write tensors + JSON metadata to one safetensors file; returns ``path``."""
        from safetensors.torch import save_file
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.items()}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(tensors, path, metadata={_META_KEY: json.dumps(self.metadata, default=str)})
        return path


def load_eva_state_dict(path: str, device: Optional[str] = None) -> EvaStateDict:
    """Read a file written by :meth:`EvaStateDict.save` (metadata restored, order preserved)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt", device=device or "cpu") as f:
        meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
        order = meta.get("order") or list(f.keys())
        tensors = {k: f.get_tensor(k) for k in order}
    return EvaStateDict(tensors, metadata=meta)
