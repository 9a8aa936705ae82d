"""Every GPU measurement in one command (``make gpu-check``), within a time budget.

    python -m benches.gpu_check [--budget 510] [--skip-benches] [--dry-run]

Steps, each with its own time limit (and never beyond what is left of the budget):

1. ``tests``: the suite's GPU tests on the compiled Triton kernels (no interpreter), the CUDA C++
   kernel, and the engine on CUDA against the CPU result and the exact PCA:
   ``tests/ops`` (every op and backend on CUDA; the CPU-only fuzz tests are left out),
   ``tests/backends``, ``tests/engine/test_engine_cuda.py``.
2. ``bench_cov_update``: every backend and the PyTorch baselines (fp32, tf32, bf16 GEMM) at
   d = 1024, 4096, 14336 and n = 512, 8192, bf16 and fp32, without and with the engine's shift
   (16-bit: the bf16-split tensor-core path), with the bf16 GEMM peak measured in the same run.
3. ``bench_topk_eigh``: the eigensolver's products and orthonormalisation per backend; then
   ``bench_small_eigh``: B x (b, b) eigh on the device vs the host route (``rayleigh_ritz``);
   ``bench_batched_products``: a batched product on symmetric copies vs in place (no d x d copy);
   ``bench_polish``: the final polish per Krylov depth (which depth ``"auto"`` should pick on GPUs).
4. ``bench_engine_gpu``: EVA against the forward passes alone (and PEFT's EVA) on a random-weight
   Llama, with batched and with per-group solves.

Each bench writes ``benches/results/<bench>_<gpu>.json``; this script writes
``benches/results/gpu_check_<gpu>.json`` (every step: command, status, seconds, the end of its
output) and prints a summary table. ``--dry-run`` runs the same steps on a machine without a GPU
(the benches in their ``--dry-run`` mode, the summary under /tmp/eva-benches): a check of this
script, not a measurement. Exit code 1 when the tests fail or time out. Run it from the
repository root on a GPU machine after ``pip install --no-deps --no-build-isolation -e .``
(``make gpu-check`` does both).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Step(NamedTuple):
    name: str
    command: List[str]
    limit_s: int
    required: bool  # a failure fails the check (the tests); benches are reported, not required


def steps(dry_run: bool) -> List[Step]:
    py = sys.executable
    dry = ["--dry-run"] if dry_run else []
    sizes = ["--shift", "none,mean"] + ([] if dry_run else ["--d", "1024,4096,14336", "--n", "512,8192"])
    return [
        Step("tests", [py, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "tests/ops", "tests/backends",
                       "tests/engine/test_engine_cuda.py", "--ignore=tests/ops/test_fuzz_ops.py"], 150, True),
        Step("bench_cov_update", [py, "-m", "benches.ops.bench_cov_update", "--device", "cuda",
                                  *sizes, *dry], 160, False),
        Step("bench_topk_eigh", [py, "-m", "benches.ops.bench_topk_eigh", *dry], 50, False),
        Step("bench_small_eigh", [py, "-m", "benches.ops.bench_small_eigh", *dry], 30, False),
        Step("bench_batched_products", [py, "-m", "benches.ops.bench_batched_products", *dry], 30, False),
        Step("bench_polish", [py, "-m", "benches.ops.bench_polish", *(["--dry-run"] if dry else
                              ["--device", "cuda", "--d", "4096,14336", "--batched", "8", "--spectra", "flat,decaying"])],
             60, False),
        # H200, 2026-11-26: the tests took 80 s, bench_cov_update 58 s, bench_topk_eigh 19 s; two engine
        # configurations 44 s, and all six plus PEFT did not fit 130 s: two backends and capped PEFT steps.
        Step("bench_engine_gpu", [py, "-m", "benches.engine.bench_engine_gpu", "--model", "small", "--with-peft",
                                  "--peft-max-steps", "8", "--backends", "triton,torch", "--batch-solves", "on",
                                  *dry], 230, False),
    ]


def run_step(step: Step, budget_left: float) -> Dict:
    limit = max(1, int(min(step.limit_s, budget_left)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels only
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {limit} s"
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    seconds = time.perf_counter() - t0
    print(f"[gpu-check] {step.name}: {status} in {seconds:.0f} s", flush=True)
    print("\n".join(output.splitlines()[-40:]), flush=True)
    return {"step": step.name, "command": " ".join(step.command), "status": status, "seconds": round(seconds, 1),
            "required": step.required, "output_tail": output[-6000:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=510, help="seconds for all steps (default 510: 8.5 min)")
    parser.add_argument("--skip-benches", action="store_true", help="only the tests")
    parser.add_argument("--dry-run", action="store_true", help="check this script without a GPU (no measurement)")
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available() and not args.dry_run:
        print("gpu-check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine")
        return 1
    from . import harness
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "dry-run"
    t_start = time.perf_counter()
    results = []
    for step in steps(args.dry_run):
        if args.skip_benches and not step.required:
            continue
        left = args.budget - (time.perf_counter() - t_start)
        if left <= 5:
            results.append({"step": step.name, "status": "not run (budget spent)", "seconds": 0.0,
                            "required": step.required})
            continue
        results.append(run_step(step, left))
    payload = {"bench": "gpu_check", "env": harness.environment("cuda"), "steps": results,
               "seconds": round(time.perf_counter() - t_start, 1)}
    folder = harness.SCRATCH_DIR if args.dry_run else harness.RESULTS_DIR
    out = harness.write_json(os.path.join(folder, f"gpu_check_{harness.slug(gpu)}.json"), payload)
    rows = [{k: r[k] for k in ("step", "status", "seconds")} for r in results]
    harness.print_table(rows, ["step", "status", "seconds"], title=f"gpu-check on {gpu} ({out})")
    failed = [r for r in results if r["required"] and r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
