"""EVA at LLM width within a memory budget: a Llama-3.1-8B-shaped model, budget vs unbounded.

Setting (issue 10): a random-weight ``LlamaForCausalLM`` with Llama-3.1-8B's layer shapes
(hidden 4096, intermediate 14336, 32 heads, 8 KV heads) and a small vocabulary, ``--layers``
decoder layers (2-4 on this CPU; ``--layers 32 --device cuda`` for the full depth on a GPU).
EVA on all seven projections (r=16, rho=2, tau=0.99) over ``--batches`` random-token batches
(``max_steps`` = all of them, so both runs take the same batches and steps). Per layer the
statistics hold ``3 d^2 + d_ff^2`` floats (q/k/v share one input, gate/up one): 1.02 GB, so the
unbounded run holds ``layers x 1.02 GB``, while ``--budget 2GB`` calibrates one layer at a time.

Each mode runs in its own process (so peak RSS is its own) and reports: wall time, peak bytes of
live statistics (the engine's count), peak RSS above the RSS after building the model and the
batches, on CUDA ``torch.cuda.max_memory_allocated`` above the model, and the block inputs cached.
Then per layer the subspace overlap of the two runs' components and whether the ranks agree.

Goals: peak statistics <= budget (+ one block's activations in RSS terms), overlap >= 0.99999
and equal ranks, layer-sequential wall time <= 1.3x the unbounded run.

Run from the repository root:
    python -m benches.engine.bench_llm_width [--layers 4] [--budget 2GB] [--batches 6]
    python -m benches.engine.bench_llm_width --layers 32 --device cuda --dtype bfloat16
    python -m benches.engine.bench_llm_width --quick     (2 layers, 3 batches: a smoke test)
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

from benches import harness

SCRIPT = "python -m benches.engine.bench_llm_width"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)


def parse_args(argv=None):
    p = harness.parser(__doc__, SCRIPT, dry_run=False, quick="2 layers, 3 batches of 1 x 128 (a smoke test)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--budget", default="2GB", help="memory_budget of the bounded run (default: %(default)s)")
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="weights (default: float32 on CPU, whose bf16 GEMMs are 5x slower here; bfloat16 on GPUs)")
    p.add_argument("--child", nargs=2, metavar=("MODE", "JSON"), help=argparse_hidden())
    return p.parse_args(argv)


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def build(args):
    """(model, batches) with fixed seeds: the same in every process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    dtype = getattr(torch, args.dtype)
    cfg = LlamaConfig(num_hidden_layers=args.layers, vocab_size=args.vocab, max_position_embeddings=max(args.seq, 128),
                      **SHAPE)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, args.vocab, (args.batch_size, args.seq), generator=g)
        batches.append({"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device)})
    return model, batches


def child(args, mode: str, out: str) -> None:
    """One run (``mode``: "budget" or "unbounded"); writes its numbers and components."""
    import torch
    import eva
    from benches.engine.common import lora_eva_config
    model, batches = build(args)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    base_rss = _rss_bytes()
    cfg = lora_eva_config(TARGETS, args.r, args.rho, 0.99)
    options = dict(max_steps=args.batches)
    if mode == "budget":
        options["memory_budget"] = args.budget
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "EVA stopped")
        sd = eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, **options)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    run = sd.metadata["run"]
    record = {
        "mode": mode, "seconds": seconds, "run_mode": run["mode"], "memory_budget": run["memory_budget"],
        "windows": len(run["windows"]), "steps": run["steps"], "forward_seconds": run["forward_seconds"],
        "stats_seconds": run["stats_seconds"], "solve_seconds": run["solve_seconds"],
        "polish_seconds": run["polish_seconds"], "peak_statistics_bytes": run["peak_statistics_bytes"],
        "peak_cache_bytes": run["peak_cache_bytes"],
        "peak_rss_above_model_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss,
        "cuda_peak_above_model_bytes": (torch.cuda.max_memory_allocated() - base_cuda) if cuda else None,
        "ranks": {n: info["rank"] for n, info in sd.metadata["layers"].items()},
    }
    torch.save({n: t.cpu() for n, t in sd.items()}, out + ".pt")
    with open(out, "w") as fh:
        json.dump(record, fh)


def compare(a_path: str, b_path: str):
    import torch
    from eva_kernels import subspace_overlap
    a, b = torch.load(a_path + ".pt"), torch.load(b_path + ".pt")
    overlaps = {n: float(subspace_overlap(a[n].double(), b[n].double())) for n in a if a[n].shape[0] and
                a[n].shape == b[n].shape}
    same_shapes = all(a[n].shape == b[n].shape for n in a)
    return overlaps, same_shapes


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.layers, args.batches, args.batch_size, args.seq = 2, 3, 1, 128
    if args.dtype is None:
        args.dtype = "float32" if args.device == "cpu" else "bfloat16"
    if args.child:
        return child(args, *args.child)
    if args.device.startswith("cuda"):
        harness.require_cuda(SCRIPT)
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("layers", "budget", "batches", "batch_size", "seq", "vocab", "r", "rho", "device", "dtype")]
    records = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("unbounded", "budget"):
            path = os.path.join(tmp, f"{mode}.json")
            print(f"{SCRIPT}: {mode} run ({args.layers} layers, {args.batches} batches of {args.batch_size} x "
                  f"{args.seq}) ...", flush=True)
            subprocess.run([sys.executable, "-m", "benches.engine.bench_llm_width", *passthrough, "--child", mode, path],
                           check=True)
            with open(path) as fh:
                records[mode] = json.load(fh)
        overlaps, same_shapes = compare(os.path.join(tmp, "unbounded.json"), os.path.join(tmp, "budget.json"))
    un, bu = records["unbounded"], records["budget"]
    same_ranks = un["ranks"] == bu["ranks"] and same_shapes
    summary = {
        "time_ratio_budget_over_unbounded": bu["seconds"] / un["seconds"],
        "min_overlap": min(overlaps.values()),
        "same_ranks": same_ranks,
        "statistics_within_budget": bu["peak_statistics_bytes"] <= bu["memory_budget"],
    }
    gib = 2 ** 30
    rows = [{"mode": m, "engine mode": r["run_mode"], "windows": r["windows"], "s": r["seconds"],
             "forward s": r["forward_seconds"], "solve s": r["solve_seconds"] + r["polish_seconds"],
             "stats GiB": r["peak_statistics_bytes"] / gib, "RSS+ GiB": r["peak_rss_above_model_bytes"] / gib,
             "cache GiB": r["peak_cache_bytes"] / gib,
             **({"cuda+ GiB": r["cuda_peak_above_model_bytes"] / gib} if r["cuda_peak_above_model_bytes"] is not None
                else {})} for m, r in records.items()]
    payload = {"environment": harness.environment(args.device), "command": f"{SCRIPT} " + " ".join(passthrough),
               "setting": {k: getattr(args, k) for k in ("layers", "budget", "batches", "batch_size", "seq", "vocab",
                                                          "r", "rho", "device", "dtype")},
               "runs": records, "overlaps": overlaps, "summary": summary}
    out = args.out or harness.default_out(f"engine_llama8b_shape_{args.layers}l", args.device, partial=args.quick)
    harness.report(out, payload, rows, list(rows[0]), title="Llama-3.1-8B-shaped layers: memory budget vs unbounded")
    print(f"\nlayer-sequential / unbounded wall time {summary['time_ratio_budget_over_unbounded']:.2f}x (goal <= 1.3); "
          f"min overlap {summary['min_overlap']:.6f} (goal >= 0.99999); same ranks {same_ranks}; statistics within "
          f"budget {summary['statistics_within_budget']}")


if __name__ == "__main__":
    main()
