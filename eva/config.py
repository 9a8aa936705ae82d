"""Engine settings: PEFT's ``LoraConfig``/``EvaConfig`` fields plus the engine's own options.

``resolve_settings(peft_config, options)`` merges them into one :class:`EvaSettings`.
Unknown options raise a ``TypeError`` naming them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .errors import EvaError


@dataclass
class EvaOptions:
    """Engine options beyond PEFT's ``EvaConfig`` (pass as keyword ``**options``).

    Attributes:
        centered: PCA of mean-centred activations (PEFT's behaviour). False: uncentred
            second moment (top right-singular vectors of the raw token matrix).
        max_steps: stop after this many batches even if not converged (None: until the
            loader is exhausted). PEFT cycles the loader forever; with exact statistics a
            second pass adds no information, so we stop at the end of the data.
        on_unconverged: "warn" (default) or "error" when data ran out / max_steps was hit
            while some needed component had not converged (the result is then the exact PCA
            of every token consumed).
        skip_empty_batches: False (default) raises on a batch whose mask keeps no token;
            True skips such batches with a warning.
        skip_rest_of_forward: stop the forward pass once every layer that still needs data
            has captured its input (results are identical, time is saved).
        oversample: extra eigensolver block columns; iters: subspace iterations per batch.
        final_tol: residual tolerance ``||C v - theta v|| <= final_tol * theta_1`` of the final
            polish solve (warm-started from the streaming estimate); final_max_iters caps it.
        backend: eva_kernels backend ("auto", "torch", "triton", "cpp"; default EVA_BACKEND).
        seed: seed of the eigensolver's random test matrices.
    """

    centered: bool = True
    max_steps: Optional[int] = None
    on_unconverged: str = "warn"
    skip_empty_batches: bool = False
    skip_rest_of_forward: bool = True
    oversample: int = 8
    iters: int = 2
    final_tol: float = 1e-4
    final_max_iters: int = 50
    backend: Optional[str] = None
    seed: int = 0

    def __post_init__(self):
        if self.on_unconverged not in ("warn", "error"):
            raise EvaError(f"on_unconverged must be 'warn' or 'error', got {self.on_unconverged!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise EvaError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.oversample < 0 or self.iters < 1:
            raise EvaError("oversample must be >= 0 and iters >= 1")
        if self.backend is not None:
            from eva_kernels._backends import BACKEND_NAMES
            if not isinstance(self.backend, str) or self.backend.strip().lower() not in ("auto",) + BACKEND_NAMES:
                raise EvaError(f"backend must be None or one of auto, {', '.join(BACKEND_NAMES)}; got {self.backend!r}")


@dataclass
class EvaSettings:
    """Everything the engine needs, resolved from the PEFT config and the options."""

    r: int
    rank_pattern: Dict[str, int]
    target_modules: Any
    rho: float
    tau: float
    use_label_mask: bool
    label_mask_value: int
    whiten: bool
    adjust_scaling_factors: bool
    options: EvaOptions = field(default_factory=EvaOptions)
    peft_config: Any = None

    def metadata(self) -> Dict[str, Any]:
        out = {k: getattr(self, k) for k in ("r", "rho", "tau", "use_label_mask", "label_mask_value",
                                             "whiten", "adjust_scaling_factors")}
        out["rank_pattern"] = dict(self.rank_pattern)
        tm = self.target_modules
        out["target_modules"] = sorted(tm) if isinstance(tm, (set, list, tuple)) else tm
        out.update({k: v for k, v in dataclasses.asdict(self.options).items()})
        return out


_EVA_DEFAULTS = dict(rho=2.0, tau=0.99, use_label_mask=True, label_mask_value=-100, whiten=False,
                     adjust_scaling_factors=True)


def resolve_settings(peft_config: Any, options: Dict[str, Any]) -> EvaSettings:
    """Build :class:`EvaSettings` from a ``LoraConfig`` (or any object with the same fields)."""
    if peft_config is None:
        raise EvaError("peft_config is required if model is not a PeftModel: pass a "
                       "peft.LoraConfig(r=..., target_modules=..., init_lora_weights='eva')")
    known = {f.name for f in dataclasses.fields(EvaOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"get_eva_state_dict got unknown option(s) {unknown}; known: {sorted(known)}")
    eva_cfg = getattr(peft_config, "eva_config", None)
    vals = {k: (getattr(eva_cfg, k) if eva_cfg is not None and hasattr(eva_cfg, k) else v)
            for k, v in _EVA_DEFAULTS.items()}
    r = getattr(peft_config, "r", None)
    if not isinstance(r, int) or r < 1:
        raise EvaError(f"peft_config.r must be a positive int, got {r!r}")
    if vals["rho"] < 1.0:
        raise EvaError(f"eva_config.rho must be >= 1.0, got {vals['rho']}")
    if not 0.0 <= vals["tau"] <= 1.0:
        raise EvaError(f"eva_config.tau must be in [0, 1], got {vals['tau']}")
    return EvaSettings(
        r=r,
        rank_pattern=dict(getattr(peft_config, "rank_pattern", None) or {}),
        target_modules=getattr(peft_config, "target_modules", None),
        options=EvaOptions(**options),
        peft_config=peft_config,
        **vals,
    )
