"""End of a run: warn or raise for unconverged layers, polish the estimates, allocate the final
ranks, whiten, and assemble the :class:`EvaStateDict` with its metadata.

Works on the run's :class:`eva.engine.state.RunState` (and the settings), never on the engine."""
from __future__ import annotations

import math
import time
import warnings

import torch

import eva_kernels

from ..config import EvaSettings
from ..errors import EvaError, EvaNotConvergedError
from ..result import FORMAT, EvaStateDict
from . import allocation, polish_plan, precision
from .observer import EvaObserver
from .state import RunState
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


def _check_converged(state: RunState, settings: EvaSettings) -> None:
    """Warn (or raise, with ``on_unconverged="error"``) naming the layers that did not converge."""
    unconverged = [g for g in state.groups if not g.converged and not g.estimate.zero_variance]
    if not unconverged:
        return
    names = [m for g in unconverged for m in g.members]
    msg = (f"EVA stopped ({state.stop_reason} after {state.step} batches) before {len(names)} layer(s) converged "
           f"(tau={settings.tau}): {names[:6]}{' ...' if len(names) > 6 else ''}. Their components are "
           "the exact PCA of every token consumed; more data (or a lower tau) would let them converge.")
    if settings.options.on_unconverged == "error":
        raise EvaNotConvergedError(msg)
    warnings.warn(msg)


def polish_groups(groups, solver, step: int, tol=None, wanted=None) -> int:
    """Final solve of ``groups`` to the residual tolerance (warm-started, :meth:`Solver.polish`;
    ``tol``, ``wanted``: see there), then one sync of their pending values; returns the rounds
    of a batched polish (0: per group)."""
    rounds = solver.polish(groups, step, tol=tol, wanted=wanted)
    solver.sync(groups, step)
    return rounds


def _screened_polish(state: RunState, solver, live, screen_tol: float) -> None:
    """Every live group polished to ``screen_tol``, then only the components the allocation may
    keep to ``final_tol`` (:mod:`eva.engine.polish_plan`), in the groups the screen left above
    it; records ``state.polish_screen``."""
    rounds = polish_groups(live, solver, state.step, tol=screen_tol)
    solved = [g for g in state.groups if g.stats is not None]
    apply_variance_floor(solved)
    keep = polish_plan.components_to_polish(solved, state.offers(), state.max_components(), state.budget,
                                            polish_plan.margins(solved))
    final_tol = solver.opts.final_tol
    wanted = {g.index: keep[g.index] for g in live
              if keep[g.index] > 0 and (g.estimate.polished_residual is None or g.estimate.polished_residual > final_tol)}
    again = [g for g in live if g.index in wanted]
    if again:
        rounds += polish_groups(again, solver, state.step, wanted=wanted)
    state.polish_rounds = max(state.polish_rounds, rounds)
    state.polish_screen = {
        "tol": screen_tol,
        "groups": len(live),
        "groups_polished": len(again),
        "components_offered": sum(g.max_components for g in live),
        "components_polished": sum(wanted.values()),
    }


def _polish(state: RunState, solver, settings: EvaSettings) -> None:
    """Final solve of every group whose statistic is still live (a layer-sequential run polished
    and freed each group at the end of its window), screened when ``polish_screen_tol`` asks
    (:func:`_screened_polish`), the variance floor over every group, the final allocation."""
    t_polish = time.perf_counter()
    if not state.groups:  # every batch was skipped (skip_empty_batches=True): nothing was captured
        raise EvaError(f"every batch was skipped ({state.step} batch(es)): no token left after the padding/label "
                       "mask; check the attention masks and labels, or set use_label_mask=False")
    live = [g for g in state.groups if g.stats is not None and g.stats.live]
    opts = settings.options
    screen = opts.polish_screen_tol
    if live and screen is not None and screen > opts.final_tol:
        _screened_polish(state, solver, live, screen)
    else:
        state.polish_rounds = max(state.polish_rounds, polish_groups(live, solver, state.step))
    solved = [g for g in state.groups if g.stats is not None]
    _check_zero_variance(apply_variance_floor(solved), len(solved))
    allocation.reallocate(state)
    state.polish_seconds += time.perf_counter() - t_polish


def _layer_components(state: RunState, settings: EvaSettings, name: str):
    """(rank, in_features) fp32 components of layer ``name``, whitened when asked."""
    g = state.group_of[name]
    rank = state.ranks[name]
    needed = allocation.tokens_needed(rank, settings.options.centered)
    if rank > 0 and g.estimate.tokens < needed:
        raise EvaError(f"layer {name} was assigned rank {rank} but saw only {g.estimate.tokens} token(s): at least "
                       f"{needed} are needed; pass more data or lower r")
    u = g.estimate.components[:rank].to(torch.float32).clone()
    if settings.whiten and rank > 0:
        # PEFT's convention: divide by the square root of the singular values
        # sigma_i = sqrt(lambda_i) of the (centred) token matrix, once per layer.
        sigma = g.estimate.eigenvalues[:rank].to(torch.float32).clamp_min(1e-30).sqrt()
        u = u / sigma.sqrt().unsqueeze(1)
    return u


def _layer_info(state: RunState, name: str) -> dict:
    g, est, target, rank = state.group_of[name], state.group_of[name].estimate, state.targets[name], state.ranks[name]
    min_cos = min(est.cosines[:rank]) if est.cosines and rank else None
    return {
        "rank": rank,
        "configured_rank": target.rank,
        "max_components": target.max_components,
        "in_features": g.d,
        "group": g.leader,
        "explained_variance_ratio": [float(v) for v in est.ratios[: target.max_components]],
        "tokens": est.tokens,
        "steps": est.steps,
        "solves": est.solves,
        "converged": bool(g.converged),  # the engine's decision for the layer's group
        "zero_variance": bool(est.zero_variance),  # offered no component (see eva.engine.variance_floor)
        "min_cosine": None if min_cos is None or math.isnan(min_cos) else min_cos,
        # batches its statistics took on each cov_update path, and its largest measured R
        # (eva.engine.precision; R is None before the group's first solve or when uncentred)
        "statistics_batches": dict(g.stats.batches) if g.stats is not None else None,
        "moment_ratio": g.stats.max_ratio if g.stats is not None else None,
    }


def _run_info(state: RunState) -> dict:
    """The ``run`` section of the metadata (one place, shared with :func:`empty_result`)."""
    return {
        "steps": state.step,
        "batches_read": state.batches_read,
        "stop_reason": state.stop_reason,
        "rank_budget": state.budget,
        "seconds": (time.perf_counter() - state.started) if state.started else 0.0,
        "forward_seconds": state.forward_seconds,
        "stats_seconds": state.stats_seconds,
        "solve_seconds": state.solve_seconds,
        "polish_seconds": state.polish_seconds,
        "polish_rounds": state.polish_rounds,
        "polish_krylov_depth": state.polish_krylov_depth,
        "polish_screen": dict(state.polish_screen) if state.polish_screen else None,
        "cadence": state.cadence.describe() if state.cadence is not None else None,
        "peak_statistics_bytes": state.peak_stat_bytes,
        "mode": state.mode,
        "memory_budget": state.memory_budget,
        "windows": [dict(w) for w in state.windows],
        "peak_cache_bytes": state.peak_cache_bytes,
        "backend": state.backends.get("cov_update", ""),
        "backends": dict(state.backends),
        "orthonormalization": state.orthonormalization,
        "statistics_precision": precision.summary(state.groups),
        "distributed": state.distributed,
        "communication": (state.traffic.summary(state.step, sum(4 * g.d * g.d for g in state.groups))
                          if state.distributed else None),
        "eva_kernels_version": eva_kernels.__version__,
        "torch_version": torch.__version__,
    }


def _metadata(state: RunState, settings: EvaSettings, layers: dict) -> dict:
    return {
        "format": FORMAT,
        "order": list(state.order),
        "settings": settings.metadata(),
        "layers": layers,
        "groups": [g.members for g in state.groups],
        "groups_split": [list(m) for m in state.split_groups],  # layers that shared a first input only
        "run": {**_run_info(state), "convergence": settings.options.convergence_rule},  # the rule that ran
    }


def build_result(state: RunState, settings: EvaSettings, solver, device, observer: EvaObserver) -> EvaStateDict:
    """Polish every group's estimate, allocate the final ranks, whiten, and assemble the result.

    ``solver``: the run's :class:`eva.engine.solve.Solver`; ``device``: where the components go
    (None: where they were computed).
    """
    _check_converged(state, settings)
    _polish(state, solver, settings)
    precision.warn_if_exceeded(state.groups)
    observer.on_finish(state)
    tensors = {}
    for name in state.order:
        u = _layer_components(state, settings, name)
        tensors[name] = u.to(device) if device is not None else u
    layers = {name: _layer_info(state, name) for name in state.order}
    return EvaStateDict(tensors, metadata=_metadata(state, settings, layers))


def empty_result(settings: EvaSettings, unsupported) -> EvaStateDict:
    """The result when no targeted layer is one EVA initialises (PEFT returns ``{}`` too)."""
    state = RunState(order=[], targets={}, budget=0, ranks={}, stop_reason="no_eva_targets")
    meta = _metadata(state, settings, {})
    meta["run"]["unsupported_layers"] = list(unsupported)
    return EvaStateDict({}, metadata=meta)
