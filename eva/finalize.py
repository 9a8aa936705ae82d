"""End of a run: warn or raise for unconverged layers, polish the estimates, allocate the final
ranks, whiten, and assemble the :class:`EvaStateDict` with its metadata."""
from __future__ import annotations

import math
import time
import warnings

import torch

import eva_kernels

from .allocation import redistribute_ranks
from .errors import EvaError, EvaNotConvergedError
from .estimates import solve_group, sync_groups
from .result import FORMAT, EvaStateDict
from .variance_floor import apply_variance_floor


def _check_zero_variance(flagged, n_groups: int) -> None:
    """One warning naming the zero-variance layers; an error when every group is one."""
    if not flagged:
        return
    names = [m for g in flagged for m in g.members]
    shown = f"{names[:8]}{' ...' if len(names) > 8 else ''}"
    if len(flagged) == n_groups:
        raise EvaError(f"every target layer saw inputs with (near-)zero variance (constant up to rounding noise), "
                       f"so there is nothing to initialise from: {shown}; are all tokens of the calibration data "
                       "the same (one repeated token or sentence)? Calibrate on varied data")
    warnings.warn(f"EVA: {len(names)} layer(s) saw inputs with (near-)zero variance (constant up to rounding "
                  f"noise) and get rank 0: {shown}; their share of the rank budget went to the other layers. "
                  "Calibrate on more varied data, or leave them out of target_modules")


def build_result(engine, stop_reason: str, t0: float, forward_seconds: float) -> EvaStateDict:
    """Polish every group's estimate, allocate the final ranks, whiten, and assemble the result."""
    unconverged = [g for g in engine.groups if not g.converged and not g.zero_variance]
    if unconverged:
        names = [m for g in unconverged for m in g.members]
        msg = (f"EVA stopped ({stop_reason} after {engine.step} batches) before {len(names)} layer(s) converged "
               f"(tau={engine.settings.tau}): {names[:6]}{' ...' if len(names) > 6 else ''}. Their components are "
               "the exact PCA of every token consumed; more data (or a lower tau) would let them converge.")
        if engine.opts.on_unconverged == "error":
            raise EvaNotConvergedError(msg)
        warnings.warn(msg)
    t_polish = time.perf_counter()
    if not engine.groups:  # every batch was skipped (skip_empty_batches=True): nothing was captured
        raise EvaError(f"every batch was skipped ({engine.step} batch(es)): no token left after the padding/label "
                       "mask; check the attention masks and labels, or set use_label_mask=False")
    solved = [g for g in engine.groups if g.stats is not None]
    for g in solved:
        solve_group(g, engine.opts, engine.step, engine.distributed, final=True)
    sync_groups(solved, engine.step)
    _check_zero_variance(apply_variance_floor(solved), len(solved))
    engine.ranks = redistribute_ranks(engine.order, engine._max_components(), engine._offers(), engine.budget)
    polish_seconds = time.perf_counter() - t_polish
    min_tokens = 1 if engine.opts.centered else 0
    state, layers = {}, {}
    for name in engine.order:
        g = engine.group_of[name]
        rank = engine.ranks[name]
        if rank > 0 and g.tokens < rank + min_tokens:
            raise EvaError(f"layer {name} was assigned rank {rank} but saw only {g.tokens} token(s): at least "
                           f"{rank + min_tokens} are needed; pass more data or lower r")
        u = g.components[:rank].to(torch.float32).clone()
        if engine.settings.whiten and rank > 0:
            # PEFT's convention: divide by the square root of the singular values
            # sigma_i = sqrt(lambda_i) of the (centred) token matrix, once per layer.
            sigma = g.eigenvalues[:rank].to(torch.float32).clamp_min(1e-30).sqrt()
            u = u / sigma.sqrt().unsqueeze(1)
        state[name] = u.to(engine.device) if engine.device is not None else u
        layers[name] = {
            "rank": rank,
            "configured_rank": engine.targets[name].rank,
            "max_components": engine.targets[name].max_components,
            "in_features": g.d,
            "group": g.leader,
            "explained_variance_ratio": [float(v) for v in g.ratios[: engine.targets[name].max_components]],
            "tokens": g.tokens,
            "steps": g.steps,
            "converged": bool(g.converged),  # the engine's decision for the layer's group
            "zero_variance": bool(g.zero_variance),  # offered no component (see eva.variance_floor)
            "min_cosine": (min(g.cosines[:rank]) if g.cosines and rank else None),
        }
    for info in layers.values():
        if info["min_cosine"] is not None and math.isnan(info["min_cosine"]):
            info["min_cosine"] = None
    meta = {
        "format": FORMAT,
        "order": list(engine.order),
        "settings": engine.settings.metadata(),
        "layers": layers,
        "groups": [g.members for g in engine.groups],
        "run": {
            "steps": engine.step,
            "stop_reason": stop_reason,
            "rank_budget": engine.budget,
            "seconds": time.perf_counter() - t0,
            "forward_seconds": forward_seconds,
            "polish_seconds": polish_seconds,
            "backend": eva_kernels.ops._backends.resolve(
                "cov_update", next(iter(g.stats.cov.device for g in solved)), engine.opts.backend),
            "distributed": engine.distributed,
            "eva_kernels_version": eva_kernels.__version__,
            "torch_version": torch.__version__,
        },
    }
    return EvaStateDict(state, metadata=meta)


def empty_result(settings, unsupported) -> EvaStateDict:
    """The result when no targeted layer is one EVA initialises (PEFT returns ``{}`` too)."""
    meta = {
        "format": FORMAT,
        "order": [],
        "settings": settings.metadata(),
        "layers": {},
        "groups": [],
        "run": {"steps": 0, "stop_reason": "no_eva_targets", "rank_budget": 0, "seconds": 0.0,
                "unsupported_layers": list(unsupported), "eva_kernels_version": eva_kernels.__version__,
                "torch_version": torch.__version__},
    }
    return EvaStateDict({}, metadata=meta)
