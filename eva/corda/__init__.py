"""PEFT's CorDA preprocessing on this library's statistics: a drop-in for
``peft.tuners.lora.corda.preprocess_corda``.

    from eva.corda import preprocess_corda
    preprocess_corda(model, lora_config, run_model=lambda: [model(**b) for b in batches])
    peft_model = get_peft_model(model, lora_config)   # init_lora_weights="corda": PEFT's own init

What differs from PEFT's is only how the per-layer input covariances are gathered
(:mod:`eva.corda.covariance`): ``cov_update`` instead of a full fp32 ``x^T x`` per call, one
statistic for layers that read the same input (q/k/v), no host sync per call (one finiteness
check per layer at the end, which raises naming the layer before any module field changes), any
batch size (PEFT's hook ``squeeze(0)``s its input: batches of one), and with ``memory_budget``
the layers are calibrated in windows whose covariances fit (``run_model`` is then called once
per window). The scaling per call is PEFT's: ``x / |max(x)|`` (the largest signed entry, so the
matrices are those of inputs brought to a max of 1 per call, then averaged over calls; a call
whose maximum is 0 gives NaN, in PEFT and here). The decomposition, the cropping to each layer's
rank, the cache and covariance files are PEFT's own functions, so the adapters equal PEFT's up
to rounding.

Needs PEFT's ``peft.tuners.lora.corda``, which imports ``attrs`` (``pip install attrs``;
PEFT 0.21 does not declare it).
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ..errors import EvaError
from ..sizes import parse_bytes
from .covariance import CovarianceHooks

__all__ = ["preprocess_corda", "windows_within"]


def _peft_corda():
    try:
        from peft.tuners.lora import corda
    except ModuleNotFoundError as exc:
        raise EvaError(f"eva.corda needs PEFT's CorDA module, which failed to import ({exc}); PEFT 0.21 imports "
                       "`attr` without declaring it: pip install attrs") from exc
    return corda


def _nonempty(path: Optional[str]) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


def windows_within(names: List[str], modules: Dict[str, nn.Module], budget: Optional[int]) -> List[List[str]]:
    """``names`` cut into consecutive windows whose covariances (``d^2 x 4`` bytes per layer,
    shared inputs counted per layer) fit ``budget`` bytes; one window when ``budget`` is None."""
    if budget is None:
        return [list(names)]
    out: List[List[str]] = [[]]
    used = 0
    for name in names:
        d = modules[name].weight.shape[0 if type(modules[name]).__name__ == "Conv1D" else 1]
        need = 4 * d * d
        if need > budget:
            raise EvaError(f"CorDA: layer {name}'s covariance needs {need} bytes, more than memory_budget={budget}; "
                           "raise memory_budget")
        if used + need > budget and out[-1]:
            out.append([])
            used = 0
        out[-1].append(name)
        used += need
    return out


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config, run_model: Optional[Callable[[], None]] = None,
                     hooked_model: Optional[nn.Module] = None, *, memory_budget=None, share_inputs: bool = True,
                     backend: Optional[str] = None) -> None:
    """PEFT's ``preprocess_corda`` (same arguments and effect: ``module.eigens`` on every CorDA
    target of ``model``), the covariances gathered with ``cov_update`` (module docstring).

    ``memory_budget``: bytes (or ``"8GB"``) the covariances may hold at once; the target layers
    are then calibrated in consecutive windows, ``run_model`` called once per window (each call
    must run the same data). ``share_inputs``: one statistic for layers fed the same tensor.
    ``backend``: the ``cov_update`` backend (None: auto). The hooked model's modules keep their
    own train/eval modes afterwards (PEFT leaves it in eval mode).
    """
    corda = _peft_corda()
    cfg = getattr(lora_config, "corda_config", None)
    if cfg is None:
        raise EvaError("preprocess_corda: lora_config.corda_config must be set, e.g. "
                       "LoraConfig(init_lora_weights='corda', corda_config=CordaConfig(corda_method='ipm'))")
    if _nonempty(cfg.cache_file):  # nothing to compute: PEFT loads the cached eigens
        return corda.preprocess_corda(model, lora_config, run_model, hooked_model)
    if cfg.corda_method is None:
        raise ValueError("corda_method is required when cache_file is not provided.")
    budget = None if memory_budget is None else parse_bytes(memory_budget, "memory_budget")
    targets = dict(corda.target_modules(model, lora_config))
    for name, module in targets.items():
        module.corda_method = cfg.corda_method
        key = corda.get_pattern_key(lora_config.rank_pattern.keys(), name)
        module.rank = lora_config.rank_pattern.get(key, lora_config.r)

    if _nonempty(cfg.covariance_file):
        corda.calib_cov_distribution(model, lora_config, run_model, hooked_model, cfg.covariance_file)  # loads it
        corda.collect_eigens(model, lora_config, cfg.verbose)
    else:
        if run_model is None:
            _clear(targets.values())
            raise ValueError("run_model must be specified when covariance file and cache file aren't built.")
        try:
            _calibrate(model, targets, lora_config, run_model, hooked_model or model, budget, share_inputs, backend,
                       corda)
        except BaseException:
            _clear(targets.values())  # nothing half-written: no layer keeps fields of a failed run
            raise
    corda.crop_corda_eigens(model, lora_config)
    if cfg.prune_temporary_fields:
        for module in targets.values():
            for field in ("sample_count", "covariance_matrix", "corda_method", "rank"):
                if hasattr(module, field):
                    delattr(module, field)
    if cfg.cache_file is not None:
        cache = {}
        for name, module in targets.items():
            cache.update({f"{name}.eigens.{k}": getattr(module.eigens, k) for k in ("S_WC", "U_WC", "V_WC")})
        os.makedirs(os.path.dirname(cfg.cache_file), exist_ok=True)
        torch.save(cache, cfg.cache_file)


_FIELDS = ("eigens", "sample_count", "covariance_matrix", "corda_method", "rank")


def _clear(modules) -> None:
    """Remove every field preprocessing sets on a layer."""
    for module in modules:
        for field in _FIELDS:
            if hasattr(module, field):
                delattr(module, field)


def _cropped(eigens, module):
    """The layer's eigens cut to its rank now (``ipm``: the leading ``rank`` pairs, ``kpm``: the
    trailing ones), so that full ``U`` and ``V`` of every layer are never held at once; PEFT's
    ``crop_corda_eigens`` at the end then finds them already cut (it slices to the same ranks)."""
    sl = slice(None, module.rank) if module.corda_method == "ipm" else slice(-module.rank, None)
    eigens.S_WC = eigens.S_WC[sl].clone()
    eigens.U_WC = eigens.U_WC[:, sl].clone()
    eigens.V_WC = eigens.V_WC[:, sl].clone()
    return eigens


def _calibrate(model, targets, lora_config, run_model, hooked, budget, share_inputs, backend, corda) -> None:
    """Covariances window by window, each turned into the layers' eigens at once (PEFT's
    ``collect_eigens_for_layer``) and cut to the layer's rank (:func:`_cropped`); the covariance
    file, when asked for, gets all of them. Peak memory: a window's covariances plus one layer's
    decomposition, where PEFT holds every covariance and every full ``U``/``V``."""
    cfg = lora_config.corda_config
    hooked_targets = dict(corda.target_modules(hooked, lora_config))
    names = [n for n in hooked_targets if n in targets]  # modules only the hooked model has are skipped
    missing = [n for n in targets if n not in hooked_targets]
    if missing:
        raise EvaError(f"CorDA: target layers {missing[:6]} are not in the hooked model; hook a model with the "
                       "same module names")
    keep = cfg.covariance_file is not None or not cfg.prune_temporary_fields
    saved = {}
    modes = [(m, m.training) for m in hooked.modules()]
    hooked.eval()
    try:
        for window in windows_within(names, hooked_targets, budget):
            with CovarianceHooks({n: hooked_targets[n] for n in window}, share_inputs, backend) as hooks:
                run_model()
            covariances = hooks.covariances()  # raises (naming the layer) before any field changes
            for name in window:
                module = targets[name]
                module.covariance_matrix = covariances.pop(name)
                module.sample_count = hooks.calls[name]
                module.eigens = _cropped(corda.collect_eigens_for_layer(module, lora_config), module)
                if keep:
                    saved[name] = module.covariance_matrix
                else:
                    del module.covariance_matrix
    finally:
        for m, training in modes:
            m.training = training
    if cfg.covariance_file is not None:
        os.makedirs(os.path.dirname(cfg.covariance_file), exist_ok=True)
        torch.save(saved, cfg.covariance_file)
