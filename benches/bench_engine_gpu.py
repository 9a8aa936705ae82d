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
  (final float64 solves, after the batch loop); peak CUDA memory. The engine stops the forward once every hooked layer has its
  input (``skip_rest_of_forward``), so late steps can cost less than a full forward.

``--with-peft`` adds PEFT's own ``get_eva_state_dict`` on the same loader (incremental PCA,
cycles the loader until convergence; capped at ``--peft-max-steps`` forwards).

A backend that fails is recorded with its error and the script exits with status 1 after
writing the JSON. Results: ``benches/results/engine_gpu_<device-slug>.json`` (or ``--out``).

Usage (GPU):   python benches/bench_engine_gpu.py [--model small|8b-shape] [--with-peft]
Smoke test:    python benches/bench_engine_gpu.py --dry-run   (CPU, Triton interpreter, tiny)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as bu  # noqa: E402

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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["small", "8b-shape"], default="small")
    p.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: per model)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000)")
    p.add_argument("--batches", type=int, default=32, help="batches in the loader (EVA stops earlier if converged)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rho", type=float, default=2.0)
    p.add_argument("--tau", type=float, default=0.99)
    p.add_argument("--backends", default=None, help="comma list (default: available_backends('cuda'))")
    p.add_argument("--no-lm-head", action="store_true", help="LlamaModel instead of LlamaForCausalLM")
    p.add_argument("--fwd-repeat", type=int, default=3, help="repeats of the forward-only timing (median)")
    p.add_argument("--with-peft", action="store_true", help="also time PEFT's get_eva_state_dict (slow)")
    p.add_argument("--peft-max-steps", type=int, default=40, help="cap on PEFT's forward passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help="JSON path (default benches/results/engine_gpu_<device>.json)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ set-up ------------------------
def build_model(torch, args, dev, dtype):
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


def make_batches(torch, args, vocab, dev):
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


class Timer:
    """Seconds of ``fn()``: CUDA events (and a synchronised wall clock) on GPU, wall clock on CPU."""

    def __init__(self, torch, dev):
        self.torch, self.cuda = torch, dev == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def __call__(self, fn):
        self.sync()
        if self.cuda:
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            end.record()
        self.sync()
        wall = time.perf_counter() - t0
        event = start.elapsed_time(end) / 1e3 if self.cuda else wall
        return out, wall, event


# ------------------------------------------------------------------ measurements ------------------
def forward_seconds(torch, timer, model, batches, n, repeat):
    if n == 0:
        return 0.0

    def go():
        with torch.no_grad():
            for b in batches[:n]:
                model(**b)
    return statistics.median(timer(go)[2] for _ in range(max(1, repeat)))


def kept_tokens(batches, n) -> int:
    return int(sum(int(b["attention_mask"].sum()) for b in batches[:n]))


def run_eva(eva, model, batches, cfg, backend, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, backend=backend,
                                    on_unconverged="warn", **kw)
    return sd, sum("EVA stopped" in str(w.message) for w in caught)


def bench_backend(torch, eva, timer, model, batches, cfg, backend, args, dev):
    run_eva(eva, model, batches, cfg, backend, max_steps=2)  # warm-up: JIT, autotune, lazy init
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    (sd, unconverged), eva_s, _ = timer(lambda: run_eva(eva, model, batches, cfg, backend))
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    meta = sd.metadata["run"]
    steps = meta["steps"]
    fwd_s = forward_seconds(torch, timer, model, batches, steps, args.fwd_repeat)
    tokens = kept_tokens(batches, steps)
    layers = sd.metadata["layers"].values()
    solve_s = meta["seconds"] - meta["forward_seconds"]  # "seconds" is the batch loop (polish excluded)
    return {
        "method": "eva", "backend": backend, "cov_backend": meta["backend"], "steps": steps,
        "stop": meta["stop_reason"], "eva_s": eva_s, "fwd_s": fwd_s,
        "overhead": eva_s / fwd_s - 1 if fwd_s > 0 else None,
        "goal_met": (eva_s / fwd_s - 1) <= GOAL if fwd_s > 0 else None,
        "tok/s": tokens / eva_s, "fwd_tok/s": tokens / fwd_s if fwd_s > 0 else None, "tokens": tokens,
        "fwd_ms/step": 1e3 * meta["forward_seconds"] / max(steps, 1),
        "solve_ms/step": 1e3 * solve_s / max(steps, 1), "polish_s": meta["polish_seconds"],
        "converged": f"{sum(bool(i['converged']) for i in layers)}/{len(sd)}",
        "unconverged_warning": bool(unconverged), "peak_gib": peak,
        "total_rank": sum(v.shape[0] for v in sd.values()),
    }


def bench_peft(torch, timer, model, batches, cfg, args):
    """PEFT's get_eva_state_dict (cycles the loader until convergence); capped forwards."""
    from peft.tuners.lora import eva as peft_eva

    class Cap(Exception):
        pass

    calls = [0]

    def forward_fn(m, inputs):
        if calls[0] >= args.peft_max_steps:
            raise Cap()
        calls[0] += 1
        return m(**inputs)

    def go():
        try:
            return peft_eva.get_eva_state_dict(model, batches, cfg, forward_fn=forward_fn,
                                               show_progress_bar=False), False
        except Cap:
            return None, True
        finally:  # a capped run leaves PEFT's hooks behind
            for mod in model.modules():
                for k, h in list(mod._forward_hooks.items()):
                    if isinstance(h, peft_eva._Hook):
                        del mod._forward_hooks[k]
    with torch.no_grad():
        (sd, capped), eva_s, _ = timer(go)
    steps = calls[0]  # PEFT's first forward (input hashing) counts as one
    fwd_s = forward_seconds(torch, timer, model, (batches * (steps // max(len(batches), 1) + 1)), steps,
                            args.fwd_repeat)
    tokens = kept_tokens(batches * (steps // max(len(batches), 1) + 1), steps)
    return {
        "method": "peft", "backend": "peft", "steps": steps, "stop": "capped" if capped else "converged",
        "eva_s": eva_s, "fwd_s": fwd_s, "overhead": eva_s / fwd_s - 1 if fwd_s > 0 else None,
        "goal_met": None, "tok/s": tokens / eva_s, "fwd_tok/s": tokens / fwd_s if fwd_s > 0 else None,
        "tokens": tokens, "total_rank": None if sd is None else sum(v.shape[0] for v in sd.values()),
    }


# ------------------------------------------------------------------ main --------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        bu.setup_dry_run()  # before triton / eva_kernels are imported
        args.batches, args.batch_size, args.seq, args.r = min(args.batches, 3), 2, 24, 4
        args.fwd_repeat, args.peft_max_steps = 1, min(args.peft_max_steps, 4)
    else:
        bu.require_cuda("bench_engine_gpu.py")
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig

    import eva
    import eva_kernels

    dev = "cpu" if args.dry_run else "cuda"
    backends = args.backends.split(",") if args.backends else eva_kernels.available_backends(dev)
    dtype = torch.bfloat16
    model, spec = build_model(torch, args, dev, dtype)
    batches = make_batches(torch, args, spec["vocab_size"], dev)
    cfg = LoraConfig(r=args.r, target_modules=TARGETS, init_lora_weights="eva",
                     eva_config=EvaConfig(rho=args.rho, tau=args.tau))
    timer = Timer(torch, dev)
    forward_seconds(torch, timer, model, batches, min(2, len(batches)), 1)  # warm-up

    n_params = sum(p.numel() for p in model.parameters())
    print(f"bench_engine_gpu: {'tiny (dry run)' if args.dry_run else args.model} {spec}, {n_params / 1e6:.0f}M "
          f"params {dtype} on {bu.device_name(dev)}; {args.batches} batches of {args.batch_size}x{args.seq}; "
          f"r={args.r} rho={args.rho} tau={args.tau}; backends {backends}", flush=True)
    rows, failed = [], []
    for backend in backends:
        print(f"  eva backend={backend} ...", flush=True)
        try:
            rows.append(bench_backend(torch, eva, timer, model, batches, cfg, backend, args, dev))
        except Exception as exc:  # noqa: BLE001 - record and go on with the other backends
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:240]
            failed.append(backend)
            rows.append({"method": "eva", "backend": backend, "error": msg,
                         "traceback": traceback.format_exc()})
            print(f"    FAILED: {msg}", flush=True)
    if args.with_peft:
        print("  peft get_eva_state_dict ...", flush=True)
        try:
            rows.append(bench_peft(torch, timer, model, batches, cfg, args))
        except Exception as exc:  # noqa: BLE001
            msg = f"{type(exc).__name__}: {exc}".splitlines()[0][:240]
            failed.append("peft")
            rows.append({"method": "peft", "backend": "peft", "error": msg, "traceback": traceback.format_exc()})
            print(f"    FAILED: {msg}", flush=True)

    env = bu.environment(dev)
    import transformers
    import peft
    env.update({"transformers": transformers.__version__, "peft": peft.__version__,
                "eva_kernels": eva_kernels.__version__, "available_backends": eva_kernels.available_backends(dev)})
    if "triton" in eva_kernels.available_backends(dev):
        from eva_kernels.triton_backend import FP32_DOT_PRECISION
        env["triton_fp32_dot"] = FP32_DOT_PRECISION
    config = {"model": "tiny" if args.dry_run else args.model, "model_config": spec,
              "lm_head": not args.no_lm_head, "params": n_params, "dtype": str(dtype), "batches": args.batches,
              "batch_size": args.batch_size, "seq": args.seq, "targets": TARGETS, "r": args.r, "rho": args.rho,
              "tau": args.tau, "goal_overhead": GOAL, "dry_run": args.dry_run,
              "peft_max_steps": args.peft_max_steps if args.with_peft else None}
    out = args.out or (os.path.join("/tmp", "engine_gpu_dryrun.json") if args.dry_run
                       else bu.default_out("engine_gpu", dev))
    bu.write_json(out, {"bench": "engine_gpu", "env": env, "config": config, "rows": rows})
    print(f"\nwrote {out}")
    cols = ["method", "backend", "cov_backend", "steps", "stop", "tokens", "eva_s", "fwd_s", "overhead",
            "goal_met", "tok/s", "fwd_tok/s", "fwd_ms/step", "solve_ms/step", "polish_s", "converged",
            "peak_gib", "error"]
    table = [dict(r, error=(r["error"][:60] + "...") if len(r.get("error") or "") > 60 else r.get("error"))
             for r in rows]
    bu.print_table(table, cols, title=f"EVA end to end on {env['device']} ({config['model']}, "
                                     f"{args.batch_size}x{args.seq} tokens/batch; overhead goal <= {GOAL:.0%})")
    if failed:
        sys.exit(f"bench_engine_gpu.py: failed for {failed} (see the error column / JSON tracebacks)")


if __name__ == "__main__":
    main()
