"""What the end-to-end benches share: the EVA config, the EVA and PEFT calls, forward-only timing,
the overlaps of each method's components with the exact PCA, and the run-time breakdown."""
from __future__ import annotations

import statistics
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


def add_compare_args(p, *, repeats: int) -> None:
    """The options of :func:`compare_on_cpu`: --max-length, --repeats, --backend, --no-peft,
    --peft-max-steps, --no-overlap."""
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=repeats, help="timed repeats (median)")
    p.add_argument("--backend", default=None, help="eva_kernels backend (default: auto)")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--peft-max-steps", type=int, default=None, help="cap on PEFT's forward passes (default: none)")
    p.add_argument("--no-overlap", action="store_true")


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


def overlaps_ours(model, loader, cfg, backend, **options):
    """Per-layer overlap of our components with the exact PCA of the tokens each consumed."""
    from eva.testing import TokenRecorder, overlaps_with_exact
    recorder = TokenRecorder()
    sd, _ = run_eva(model, loader, cfg, backend, observers=[recorder], **options)
    return overlaps_with_exact(sd, recorder)


def overlaps_peft(model, loader, cfg, max_steps, shared_inputs: Sequence[Sequence[str]] = ()):
    """Same for PEFT: records what each IncrementalPCA was fed (PEFT's IPCA centres too).

    ``shared_inputs``: sets of sibling layer names that read one input (e.g. ``("q_proj",
    "k_proj", "v_proj")``): PEFT hooks one member per set, the others share its statistic."""
    from peft.tuners.lora import eva as peft_eva
    from peft.utils.incremental_pca import IncrementalPCA
    from eva_kernels import subspace_overlap
    from eva_kernels.testing import exact_pca
    fed, hooks_of = {}, {}
    orig_fit, orig_call = IncrementalPCA.partial_fit, peft_eva.SVDHook.__call__

    def fit(self, X, *a, **k):
        fed.setdefault(id(self), []).append(X.detach().double().cpu())
        return orig_fit(self, X, *a, **k)

    def call(self, *a, **k):
        hooks_of[self.name] = id(self.svd)
        return orig_call(self, *a, **k)

    IncrementalPCA.partial_fit, peft_eva.SVDHook.__call__ = fit, call
    try:
        sd = run_peft(model, loader, cfg, max_steps).sd
    finally:
        IncrementalPCA.partial_fit, peft_eva.SVDHook.__call__ = orig_fit, orig_call
    out = {}
    for name, comp in (sd or {}).items():  # a capped run has no components
        if not comp.shape[0]:
            continue
        key = hooks_of.get(name)
        if key is None:  # shared-input follower: the hooked sibling of its shared-input set
            prefix, leaf = name.rsplit(".", 1)
            siblings = next((s for s in shared_inputs if leaf in s), ())
            key = next((v for n, v in hooks_of.items() if n.rsplit(".", 1)[0] == prefix
                        and n.rsplit(".", 1)[1] in siblings), None)
        _, exact, _ = exact_pca(fed[key], comp.shape[0])
        out[name] = float(subspace_overlap(comp.double(), exact))
    return out


def breakdown(run) -> dict:
    """Where one EVA run's wall time went (its own metadata): the forwards without the statistic
    updates, the updates, the streaming solves, the final polish, and the share of the run spent
    beyond the forwards and the updates (the engine's overhead)."""
    forward, stats = run["forward_seconds"], run["stats_seconds"]
    return {"fwd_s": forward - stats, "stats_s": stats, "solve_s": run["solve_seconds"],
            "polish_s": run["polish_seconds"], "beyond_%": 100.0 * (run["seconds"] - forward) / run["seconds"]}


def summarize(row, overlaps):
    row["overlap_mean"] = statistics.mean(overlaps.values())
    row["overlap_min"] = min(overlaps.values())


def compare_on_cpu(model, loader, cfg, args, options: dict, shared_inputs, name: str, title: str):
    """The CPU comparison both end-to-end CPU benches make, written to JSON and printed.

    Times (medians of ``args.repeats``, ``harness.Timer("cpu")``) the forward passes alone over
    the batches our run consumed, ``eva.get_eva_state_dict`` (with ``options``) and, unless
    ``args.no_peft``, PEFT's EVA on the same loader (``args.peft_max_steps`` caps it); then,
    unless ``args.no_overlap``, the overlaps of each method's components with the exact PCA of
    the tokens it consumed (separate, recording runs). Returns the JSON record.
    """
    from benches import harness
    timer = harness.Timer("cpu")
    forward_seconds(timer, model, loader, min(3, len(loader)), 1)  # warm-up
    run_eva(model, loader[:4], cfg, args.backend, **options)
    ours_runs = [timer.run(lambda: run_eva(model, loader, cfg, args.backend, **options))
                 for _ in range(args.repeats)]
    ours_t = statistics.median(wall for _, wall, _ in ours_runs)
    sd = ours_runs[0][0][0]
    run = sd.metadata["run"]
    fwd_t = forward_seconds(timer, model, loader, run["steps"], args.repeats)
    rows = [
        {"method": "forward only", "batches": run["steps"], "seconds": fwd_t, "x_forward": 1.0},
        {"method": f"eva-kernels ({run['backend']})", "batches": run["steps"], "seconds": ours_t,
         "x_forward": ours_t / fwd_t, "stop": run["stop_reason"], **breakdown(run)},
    ]
    result = {"env": harness.environment("cpu"), "args": vars(args), "rows": rows,
              "ours_run": run, "ours_ranks": sd.ranks}
    if not args.no_peft:
        import peft
        prun, peft_t, _ = timer.run(lambda: run_peft(model, loader, cfg, args.peft_max_steps))
        rows.append({"method": f"peft {peft.__version__.rsplit('.', 1)[0]} EVA", "batches": prun.forwards,
                     "seconds": peft_t, "x_forward": peft_t / fwd_t, "peft_over_ours": peft_t / ours_t,
                     "stop": "capped" if prun.capped else "converged"})
        if prun.sd is not None:
            result["peft_ranks"] = {k: int(v.shape[0]) for k, v in prun.sd.items()}
    if not args.no_overlap:
        result["overlap_ours"] = overlaps_ours(model, loader, cfg, args.backend, **options)
        summarize(rows[1], result["overlap_ours"])
        if not args.no_peft and "peft_ranks" in result:
            result["overlap_peft"] = overlaps_peft(model, loader, cfg, args.peft_max_steps, shared_inputs)
            summarize(rows[2], result["overlap_peft"])
    out = args.out or harness.default_out(name, "cpu", partial=args.quick)
    harness.report(out, result, rows, ["method", "batches", "seconds", "x_forward", "fwd_s", "stats_s", "solve_s",
                                       "polish_s", "beyond_%", "peft_over_ours", "overlap_mean", "overlap_min", "stop"],
                   title)
    return result
