"""What both end-to-end benches share: the EVA config, the EVA and PEFT calls, forward-only timing."""
from __future__ import annotations

import warnings
from typing import Iterable, NamedTuple, Optional, Sequence

import torch


def add_eva_args(p, *, batches: int, batch_size: int, r: int) -> None:
    """--batches, --batch-size, --r, --rho, --tau with the bench's defaults."""
    p.add_argument("--batches", type=int, default=batches,
                   help="batches in the loader (EVA stops earlier if converged)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--r", type=int, default=r)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--tau", type=float, default=0.99)


def lora_eva_config(targets, r: int, rho: float, tau: float):
    """PEFT ``LoraConfig`` asking for EVA initialisation of ``targets``."""
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig
    return LoraConfig(r=r, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(rho=rho, tau=tau))


def run_eva(model, loader, cfg, backend, observers: Iterable = (), **options):
    """``eva.get_eva_state_dict`` without a progress bar: ``(state dict, number of "EVA stopped"
    warnings)`` (other warnings are swallowed)."""
    import eva
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = eva.get_eva_state_dict(model, loader, cfg, show_progress_bar=False, backend=backend,
                                    observers=list(observers), **options)
    return sd, sum("EVA stopped" in str(w.message) for w in caught)


def forward_seconds(timer, model, batches: Sequence[dict], n: int, repeats: int) -> float:
    """Median seconds (``timer``'s device clock) of the forward passes alone over ``batches[:n]``."""
    if n == 0:
        return 0.0

    def go():
        with torch.no_grad():
            for b in batches[:n]:
                model(**b)
    return timer.median_s(go, repeats)


class PeftRun(NamedTuple):
    """PEFT's ``get_eva_state_dict``: the state dict (None when capped), its forward passes
    (its input-hashing forward included) and whether ``max_steps`` stopped it."""
    sd: Optional[dict]
    forwards: int
    capped: bool


class _Capped(Exception):
    pass


def run_peft(model, loader, cfg, max_steps: Optional[int] = None) -> PeftRun:
    """PEFT's own ``get_eva_state_dict`` on ``loader`` (it cycles the loader until convergence),
    stopped after ``max_steps`` forward passes when given."""
    from peft.tuners.lora import eva as peft_eva
    calls = [0]

    def forward_fn(m, inputs):
        if max_steps is not None and calls[0] >= max_steps:
            raise _Capped()
        calls[0] += 1
        return m(**inputs)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            sd = peft_eva.get_eva_state_dict(model, loader, cfg, forward_fn=forward_fn, show_progress_bar=False)
        return PeftRun(sd, calls[0], False)
    except _Capped:
        return PeftRun(None, calls[0], True)
    finally:  # a capped run leaves PEFT's hooks behind
        for mod in model.modules():
            for k, h in list(mod._forward_hooks.items()):
                if isinstance(h, peft_eva._Hook):
                    del mod._forward_hooks[k]
