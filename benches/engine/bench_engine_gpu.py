"""End-to-end GPU benchmark of ``eva.get_eva_state_dict`` against plain forward passes.

A random-weight Llama built from a transformers config (bf16 weights on CUDA):

* ``--model small``    hidden 2048, intermediate 5632, 16 layers, 32 heads / 4 kv heads, vocab 32000
* ``--model 8b-shape`` hidden 4096, intermediate 14336, 32 heads / 8 kv heads, vocab 32000,
  ``--layers 4`` by default (a few layers of a 7-8B model, to fit the time limit)

fed random token batches (``--batch-size 8`` x ``--seq 512``, right padding on half the
sequences), LoRA targets q,k,v,o,gate,up,down, r=16, rho=2, tau=0.99. For every backend in
``eva_kernels.available_backends("cuda")`` (after one warm-up run of 2 batches):

* (b) ``eva_s``: wall time of ``eva.get_eva_state_dict`` (synchronised before and after);
* (a) ``fwd_s``: forward passes alone (no_grad, eval) over the same number of batches EVA
  consumed (``steps``), timed with CUDA events, median of ``--fwd-repeat``;
* ``overhead`` = (b)/(a) - 1 (goal: <= 0.25), tokens/s = kept tokens of those batches / (b);
* per step from the result's metadata: ``fwd_ms/step`` (forward incl. hooks and covariance
  updates), ``solve_ms/step`` (eigen-solves, rank allocation, host sync), and ``polish_s``
  (final float64 solves, after the batch loop); peak CUDA memory. The engine stops the forward
  once every hooked layer has its input (``skip_rest_of_forward``), so late steps can cost less
  than a full forward.

``--with-peft`` adds PEFT's own ``get_eva_state_dict`` on the same loader (incremental PCA,
cycles the loader until convergence; capped at ``--peft-max-steps`` forwards).

A backend that fails is recorded with its error and the script exits with status 1 after
writing the JSON. Writes ``benches/results/engine_gpu_<gpu>.json``.

Run from the repository root:
    python -m benches.engine.bench_engine_gpu [--model small|8b-shape] [--with-peft] [--quick]
    python -m benches.engine.bench_engine_gpu --dry-run    (smoke test: tiny model on CPU, Triton interpreter)
    python -m benches.engine.bench_engine_gpu --nproc 8    (a multi-GPU machine: benches.engine.bench_distributed
                                                            --device cuda, NCCL, one GPU per rank)
"""
from __future__ import annotations

import sys
import traceback

import torch

from benches import harness
from benches.engine.common import add_eva_args, forward_seconds, lora_eva_config, run_eva, run_peft

SCRIPT = "python -m benches.engine.bench_engine_gpu"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = {
    "small": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=4, vocab_size=32000),
    "8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000),
    # --dry-run only
    "tiny": dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
}
GOAL = 0.25


def parse_args(argv=None):
    p = harness.parser(__doc__, SCRIPT, quick="8 batches, 1 forward repeat, PEFT capped at 10 forwards")
    p.add_argument("--model", choices=["small", "8b-shape"], default="small")
    p.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: per model)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000)")
    add_eva_args(p, batches=32, batch_size=8, r=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--backends", default=None, help="comma list (default: available_backends('cuda'))")
    p.add_argument("--no-lm-head", action="store_true", help="LlamaModel instead of LlamaForCausalLM")
    p.add_argument("--fwd-repeat", type=int, default=3, help="repeats of the forward-only timing (median)")
    p.add_argument("--with-peft", action="store_true", help="also time PEFT's get_eva_state_dict (slow)")
    p.add_argument("--peft-max-steps", type=int, default=40, help="cap on PEFT's forward passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks on a multi-GPU machine: > 1 runs benches.engine.bench_distributed's 8B-shaped "
                        "slice with NCCL, one GPU per rank (bytes all-reduced, time in collectives)")
    p.add_argument("--batch-solves", default="auto",
                   help="comma list of EVA batch_solves settings to run per backend: auto (batched on "
                        "GPUs), on, off (one solve per group); e.g. on,off to compare")
    return p.parse_args(argv)


# ------------------------------------------------------------------ set-up ------------------------
def build_model(args, dev, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
    spec = dict(MODELS["tiny" if args.dry_run else args.model])
    if args.layers is not None:
        spec["num_hidden_layers"] = args.layers
    if args.vocab is not None:
        spec["vocab_size"] = args.vocab
    cfg = LlamaConfig(max_position_embeddings=max(args.seq, 64), **spec)
    torch.manual_seed(args.seed)
    cls = LlamaModel if args.no_lm_head else LlamaForCausalLM
    with torch.device(dev):
        model = cls(cfg)
    return model.to(dtype).eval(), spec


def make_batches(args, vocab, dev):
    """Random ids; every other sequence right-padded by 1 .. seq/4 tokens."""
    g = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for _ in range(args.batches):
        ids = torch.randint(0, vocab, (args.batch_size, args.seq), generator=g)
        mask = torch.ones(args.batch_size, args.seq, dtype=torch.long)
        for i in range(1, args.batch_size, 2):
            pad = int(torch.randint(1, max(2, args.seq // 4 + 1), (1,), generator=g))
            mask[i, args.seq - pad:] = 0
        out.append({"input_ids": ids.to(dev), "attention_mask": mask.to(dev)})
    return out


# ------------------------------------------------------------------ measurements ------------------
def kept_tokens(batches, n) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in batches[:n]))


def rates(timer, model, batches, steps, eva_s, args):
    """The row fields shared by EVA and PEFT: forward-only time of ``steps`` batches, overhead, tokens/s."""
    fwd_s = forward_seconds(timer, model, batches, steps, args.fwd_repeat)
    tokens = kept_tokens(batches, steps)
    return {"steps": steps, "eva_s": eva_s, "fwd_s": fwd_s, "overhead": eva_s / fwd_s - 1 if fwd_s > 0 else None,
            "tok/s": tokens / eva_s, "fwd_tok/s": tokens / fwd_s if fwd_s > 0 else None, "tokens": tokens}


BATCH_SOLVES = {"auto": "auto", "on": True, "off": False}


def bench_backend(timer, model, batches, cfg, backend, args, dev, batch_solves="auto"):
    opts = {"batch_solves": BATCH_SOLVES[batch_solves]}
    run_eva(model, batches, cfg, backend, max_steps=2, **opts)  # warm-up: JIT, autotune, lazy init
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    (sd, unconverged), eva_s, _ = timer.run(lambda: run_eva(model, batches, cfg, backend, on_unconverged="warn",
                                                            **opts))
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    meta = sd.metadata["run"]
    steps = meta["steps"]
    row = {"method": "eva", "backend": backend, "cov_backend": meta["backend"], "stop": meta["stop_reason"],
           "batch_solves": batch_solves, "batched": "topk_eigh_batched" in meta["backends"]}
    row.update(rates(timer, model, batches, steps, eva_s, args))
    layers = sd.metadata["layers"].values()
    solve_s = meta["seconds"] - meta["forward_seconds"]  # "seconds" is the batch loop (polish excluded)
    row.update({
        "goal_met": row["overhead"] <= GOAL if row["overhead"] is not None else None,
        "fwd_ms/step": 1e3 * meta["forward_seconds"] / max(steps, 1),
        "solve_ms/step": 1e3 * solve_s / max(steps, 1), "polish_s": meta["polish_seconds"],
        "converged": f"{sum(bool(i['converged']) for i in layers)}/{len(sd)}",
        "unconverged_warning": bool(unconverged), "peak_gib": peak,
        "total_rank": sum(v.shape[0] for v in sd.values()),
    })
    return row


def bench_peft(timer, model, batches, cfg, args):
    """PEFT's get_eva_state_dict (cycles the loader until convergence); capped forwards."""
    prun, eva_s, _ = timer.run(lambda: run_peft(model, batches, cfg, args.peft_max_steps))
    cycled = batches * (prun.forwards // max(len(batches), 1) + 1)  # PEFT's first forward counts as one
    row = {"method": "peft", "backend": "peft", "stop": "capped" if prun.capped else "converged"}
    row.update(rates(timer, model, cycled, prun.forwards, eva_s, args))
    row.update({"goal_met": None, "total_rank": None if prun.sd is None else sum(v.shape[0] for v in prun.sd.values())})
    return row


def attempt(rows, failed, name, method, fn):
    """Append ``fn()``'s row, or an error row (and ``name`` to ``failed``) when it raises."""
    try:
        rows.append(fn())
    except Exception as exc:  # noqa: BLE001 - record and go on with the other backends
        msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:240]
        failed.append(name)
        rows.append({"method": method, "backend": name, "error": msg, "traceback": traceback.format_exc()})
        print(f"    FAILED: {msg}", flush=True)


# ------------------------------------------------------------------ main --------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.nproc > 1:  # the distributed bench on the GPUs (gloo on CPU with --dry-run)
        from benches.engine import bench_distributed
        dist_args = ["--cases", "llama8b-slice", "--nproc", str(args.nproc), "--layers", str(args.layers or 2)]
        if args.dry_run:
            dist_args[-1] = "1"  # one 8B-shaped layer: a smoke test of the launch, not a measurement
            dist_args += ["--seq", "32", "--batches", "2", "--out", harness.default_out("distributed_dry", "cpu", True)]
        else:
            dist_args += ["--device", "cuda"]
        return bench_distributed.main(dist_args + (["--out", args.out] if args.out else []))
    dev = harness.gpu_device(args, SCRIPT)  # before eva_kernels (and triton) are imported
    if args.dry_run:
        args.batches, args.batch_size, args.seq, args.r = min(args.batches, 3), 2, 24, 4
        args.fwd_repeat, args.peft_max_steps = 1, min(args.peft_max_steps, 4)
    elif args.quick:
        args.batches, args.fwd_repeat, args.peft_max_steps = min(args.batches, 8), 1, min(args.peft_max_steps, 10)
    import eva_kernels

    backends = args.backends.split(",") if args.backends else eva_kernels.available_backends(dev)
    dtype = torch.bfloat16
    model, spec = build_model(args, dev, dtype)
    batches = make_batches(args, spec["vocab_size"], dev)
    cfg = lora_eva_config(TARGETS, args.r, args.rho, args.tau)
    timer = harness.Timer(dev)
    forward_seconds(timer, model, batches, min(2, len(batches)), 1)  # warm-up

    n_params = sum(p.numel() for p in model.parameters())
    print(f"{SCRIPT}: {'tiny (dry run)' if args.dry_run else args.model} {spec}, {n_params / 1e6:.0f}M "
          f"params {dtype} on {harness.device_name(dev)}; {args.batches} batches of {args.batch_size}x{args.seq}; "
          f"r={args.r} rho={args.rho} tau={args.tau}; backends {backends}", flush=True)
    rows, failed = [], []
    settings = args.batch_solves.split(",")
    if not set(settings) <= set(BATCH_SOLVES):
        raise SystemExit(f"{SCRIPT}: --batch-solves takes auto, on, off; got {args.batch_solves!r}")
    for backend in backends:
        for bs in settings:
            print(f"  eva backend={backend} batch_solves={bs} ...", flush=True)
            attempt(rows, failed, backend, "eva",
                    lambda: bench_backend(timer, model, batches, cfg, backend, args, dev, bs))
    if args.with_peft:
        print("  peft get_eva_state_dict ...", flush=True)
        attempt(rows, failed, "peft", "peft", lambda: bench_peft(timer, model, batches, cfg, args))

    import peft
    import transformers
    env = dict(harness.environment(dev), transformers=transformers.__version__, peft=peft.__version__,
               available_backends=eva_kernels.available_backends(dev))
    if "triton" in env["available_backends"]:
        env["triton_fp32_dot"] = harness.backend_info("triton", "fp32_dot")
    config = {"model": "tiny" if args.dry_run else args.model, "model_config": spec,
              "lm_head": not args.no_lm_head, "params": n_params, "dtype": str(dtype), "batches": args.batches,
              "batch_size": args.batch_size, "seq": args.seq, "targets": TARGETS, "r": args.r, "rho": args.rho,
              "tau": args.tau, "goal_overhead": GOAL, "dry_run": args.dry_run, "quick": args.quick,
              "peft_max_steps": args.peft_max_steps if args.with_peft else None}
    out = args.out or harness.default_out("engine_gpu", dev, partial=args.quick or args.dry_run)
    cols = ["method", "backend", "cov_backend", "batch_solves", "steps", "stop", "tokens", "eva_s", "fwd_s", "overhead",
            "goal_met", "tok/s", "fwd_tok/s", "fwd_ms/step", "solve_ms/step", "polish_s", "converged",
            "peak_gib", "error"]
    table = [dict(r, error=(r["error"][:60] + "...") if len(r.get("error") or "") > 60 else r.get("error"))
             for r in rows]
    harness.report(out, {"bench": "engine_gpu", "env": env, "config": config, "rows": rows}, table, cols,
                   f"EVA end to end on {env['device']} ({config['model']}, {args.batch_size}x{args.seq} "
                   f"tokens/batch; overhead goal <= {GOAL:.0%})")
    if failed:
        sys.exit(f"{SCRIPT}: failed for {failed} (see the error column / JSON tracebacks)")


if __name__ == "__main__":
    main()
