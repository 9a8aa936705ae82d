"""End-to-end EVA on CPU: eva-kernels vs the forward passes alone vs PEFT's EVA.

Setting (issue 2): the bundled MiniLM, batches of 4 x 128 tokens of real text (Python
standard-library docstrings, :mod:`benches.text_corpus`), r=8, rho=2, tau=0.99, targets
query/key/value/dense of the encoder. Measures wall time (median of ``--repeats``) of

  (a) the forward passes alone over exactly the batches our run consumed,
  (b) ``eva.get_eva_state_dict``,
  (c) ``peft.tuners.lora.eva.get_eva_state_dict`` on the same loader (it cycles the loader
      until converged and does one extra forward to find shared inputs; its ``batches`` are
      the forward passes it ran, that one included; ``--peft-max-steps`` caps them),

then, in separate untimed runs that record every token each layer consumed (ours: the
``eva.testing.TokenRecorder`` observer; PEFT: what each of its IncrementalPCA was fed), the
subspace overlap of each method's components with the exact PCA (float64 SVD,
``eva_kernels.testing.exact_pca``) of those tokens. Writes
``benches/results/engine_cpu_<cpu>.json``.

Run from the repository root (``make bench-cpu`` runs the first):
    python -m benches.engine.bench_engine_cpu [--batches 200] [--repeats 3] [--no-peft] [--no-overlap] [--out FILE]
    python -m benches.engine.bench_engine_cpu --quick    (8 batches, 1 repeat, PEFT capped: a smoke test)
"""
from __future__ import annotations

import os
import statistics

import torch

from benches import harness
from benches.engine.common import add_eva_args, forward_seconds, lora_eva_config, run_eva, run_peft
from benches.text_corpus import stdlib_passages

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCRIPT = "python -m benches.engine.bench_engine_cpu"
TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)"


def parse_args(argv=None):
    p = harness.parser(__doc__, SCRIPT, dry_run=False,
                       quick="at most 8 batches, 1 repeat, PEFT capped at 12 forwards (a smoke test)")
    add_eva_args(p, batches=200, batch_size=4, r=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the fast runs (median)")
    p.add_argument("--backend", default=None, help="eva_kernels backend (default: auto)")
    p.add_argument("--check-every", type=int, default=1, help="EVA option check_every: batches between solves")
    p.add_argument("--no-batch-solves", action="store_true",
                   help="EVA option batch_solves=False: one solve per group (default: batched by shape)")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--peft-max-steps", type=int, default=None, help="cap on PEFT's forward passes (default: none)")
    p.add_argument("--no-overlap", action="store_true")
    return p.parse_args(argv)


def build(batches: int, batch_size: int, max_length: int):
    from transformers import AutoModel, AutoTokenizer
    from eva.cli.text_data import bundled_model_path
    path = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    passages = stdlib_passages(limit=batches * batch_size)
    loader = []
    for i in range(0, len(passages) - batch_size + 1, batch_size):
        enc = tok(passages[i:i + batch_size], padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="pt")
        loader.append(dict(enc))
    return model, loader


def overlaps_ours(model, loader, cfg, backend, **options):
    """Per-layer overlap of our components with the exact PCA of the tokens each consumed."""
    from eva.testing import TokenRecorder, overlaps_with_exact
    recorder = TokenRecorder()
    sd, _ = run_eva(model, loader, cfg, backend, observers=[recorder], **options)
    return overlaps_with_exact(sd, recorder)


def overlaps_peft(model, loader, cfg, max_steps):
    """Same for PEFT: records what each IncrementalPCA was fed (PEFT's IPCA centres too)."""
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
        if key is None:  # shared-input follower: the member of its attention block that has a hook
            prefix = name.rsplit(".", 1)[0]
            key = next((v for n, v in hooks_of.items() if n.rsplit(".", 1)[0] == prefix
                        and n.rsplit(".", 1)[1] in ("query", "key", "value")), None)
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


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.peft_max_steps = min(args.batches, 8), 1, args.peft_max_steps or 12
    torch.manual_seed(0)
    model, loader = build(args.batches, args.batch_size, args.max_length)
    cfg = lora_eva_config(TARGETS, args.r, args.rho, args.tau)
    timer = harness.Timer("cpu")
    forward_seconds(timer, model, loader, 3, 1)  # warm-up
    options = dict(check_every=args.check_every, batch_solves=not args.no_batch_solves)
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
            result["overlap_peft"] = overlaps_peft(model, loader, cfg, args.peft_max_steps)
            summarize(rows[2], result["overlap_peft"])
    out = args.out or harness.default_out("engine_cpu", "cpu", partial=args.quick)
    harness.report(out, result, rows, ["method", "batches", "seconds", "x_forward", "fwd_s", "stats_s", "solve_s",
                                       "polish_s", "beyond_%", "peft_over_ours", "overlap_mean", "overlap_min", "stop"],
                   "EVA end to end, MiniLM, CPU")


if __name__ == "__main__":
    main()
