"""Benchmark of eva_kernels.cov_update: the C++ backend vs the torch reference.

CPU mode (default): `cpp` (torch.ops.eva_kernels.cov_update_cpp) vs the `torch` backend
(reference.cov_update_torch: upcast, then MKL sgemm through addmm) on CPU tensors, for fp32 and
bf16 inputs, d in {384, 1024, 2048, 4096}, n in {512, 2048}. Wall-clock medians over repeats.
GFLOP/s counts 2 n d^2 for both (the C++ kernel computes only the upper triangle, ~half of
that). Error: max |cov - spec| / max |spec| over the upper triangle vs the float64 spec.

GPU mode (--gpu): cuda (cpp backend) vs triton vs torch on CUDA tensors with
triton.testing.do_bench medians; exits cleanly when there is no CUDA device.

Usage:
    python benches/bench_cov_update_cpu.py [--quick] [--repeats 7] [--threads N] [--gpu]
Writes benches/results/cov_update_cpu_<cpu-slug>.json (or cov_update_gpu_<gpu-slug>.json).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

import eva_kernels
from eva_kernels import reference

_ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _ROOT)
from _bench_utils import cpu_name  # noqa: E402


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:60] or "unknown"


def _rel_err_upper(cov: torch.Tensor, spec: torch.Tensor) -> float:
    u = torch.triu(cov.double()) - torch.triu(spec)
    return (u.abs().max() / spec.abs().max().clamp_min(1e-30)).item()


def _prepare(x, backend):
    """(timed closure, max rel error of one call on zeroed accumulators vs float64)."""
    d = x.shape[1]
    cov = torch.zeros(d, d, device=x.device)
    colsum = torch.zeros(d, device=x.device)
    fn = eva_kernels.ops._backends.get("cov_update", backend)
    fn(cov, colsum, x, None, None)
    spec = torch.zeros(d, d, dtype=torch.float64)
    reference.cov_update_spec(spec, torch.zeros(d, dtype=torch.float64), x.cpu(), None, None)
    err = _rel_err_upper(cov.cpu(), spec)
    return (lambda: fn(cov, colsum, x, None, None)), err


def _paired_median_ms(fns, repeats: int):
    """Median wall-clock ms of each closure, the closures interleaved in every repeat so that
    load from other processes on shared cores hits them alike."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for t, f in zip(times, fns):
            t0 = time.perf_counter()
            f()
            t.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def run_cpu(args) -> None:
    from eva_kernels import cpp_backend
    if cpp_backend.why_not("cpu") is not None:
        sys.exit(f"cpp backend unavailable: {cpp_backend.why_not('cpu')}")
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = [384, 1024] if args.quick else [384, 1024, 2048, 4096]
    ns = [512, 2048]
    dtypes = [torch.float32, torch.bfloat16]
    rows = []
    torch.manual_seed(0)
    for dt in dtypes:
        for d in ds:
            for n in ns:
                x = torch.randn(n, d).to(dt)
                reps = args.repeats if d < 4096 else max(3, args.repeats // 2)
                t_fn, t_err = _prepare(x, "torch")
                c_fn, c_err = _prepare(x, "cpp")
                t_ms, c_ms = _paired_median_ms([t_fn, c_fn], reps)
                flops = 2.0 * n * d * d
                row = dict(dtype=str(dt).replace("torch.", ""), n=n, d=d,
                           torch_ms=t_ms, cpp_ms=c_ms,
                           torch_gflops=flops / t_ms / 1e6, cpp_gflops=flops / c_ms / 1e6,
                           speedup=t_ms / c_ms, torch_rel_err=t_err, cpp_rel_err=c_err)
                rows.append(row)
                print(f"  {row['dtype']:8s} n={n:5d} d={d:5d}  torch {t_ms:8.2f} ms  cpp {c_ms:8.2f} ms"
                      f"  x{row['speedup']:.2f}", flush=True)
    meta = dict(device="cpu", cpu=cpu_name(), threads=torch.get_num_threads(),
                cpu_isa=cpp_backend.CPU_ISA, torch=torch.__version__, python=platform.python_version(),
                date=_dt.datetime.now().isoformat(timespec="seconds"), repeats=args.repeats,
                kc=os.environ.get("EVA_CPP_KC", "256"), load_avg_1min=os.getloadavg()[0],
                note="GFLOP/s counts 2*n*d^2 for both backends; cpp computes only the upper triangle")
    out = os.path.join(_ROOT, "results", f"cov_update_cpu_{_slug(meta['cpu'])}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\nwrote {out}")
    print(f"\ncov_update on {meta['cpu']} ({meta['threads']} threads, cpp ISA {meta['cpu_isa']}, "
          f"torch {meta['torch']}); interleaved medians of {args.repeats} runs (d=4096: {max(3, args.repeats // 2)}); load avg {os.getloadavg()[0]:.2f}")
    hdr = (f"| {'dtype':8s} | {'n':>5s} | {'d':>5s} | {'torch ms':>9s} | {'cpp ms':>9s} | "
           f"{'torch GF/s':>10s} | {'cpp GF/s':>9s} | {'speed-up':>8s} | {'cpp rel err':>11s} | {'torch rel err':>13s} |")
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['dtype']:8s} | {r['n']:5d} | {r['d']:5d} | {r['torch_ms']:9.2f} | {r['cpp_ms']:9.2f} | "
              f"{r['torch_gflops']:10.1f} | {r['cpp_gflops']:9.1f} | {r['speedup']:7.2f}x | "
              f"{r['cpp_rel_err']:11.2e} | {r['torch_rel_err']:13.2e} |")


def run_gpu(args) -> None:
    if not torch.cuda.is_available():
        print("--gpu: no CUDA device available here; nothing to benchmark.")
        return
    try:
        from triton.testing import do_bench
    except Exception as exc:  # noqa: BLE001
        print(f"--gpu: triton is needed for do_bench ({exc})")
        return
    dev = torch.device("cuda")
    backends = [b for b in ("cpp", "triton", "torch") if b in eva_kernels.available_backends(dev)]
    ds = [384, 1024, 2048, 4096, 8192]
    ns = [2048, 16384]
    rows = []
    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        for d in ds:
            for n in ns:
                x = torch.randn(n, d, device=dev).to(dt)
                mask = torch.rand(n, device=dev) > 0.1
                row = dict(dtype=str(dt).replace("torch.", ""), n=n, d=d)
                for b in backends:
                    fn = eva_kernels.ops._backends.get("cov_update", b)
                    cov = torch.zeros(d, d, device=dev)
                    colsum = torch.zeros(d, device=dev)
                    ms = do_bench(lambda: fn(cov, colsum, x, mask, None))
                    cov.zero_()
                    fn(cov, colsum, x, mask, None)
                    spec = torch.zeros(d, d, dtype=torch.float64)
                    reference.cov_update_spec(spec, torch.zeros(d, dtype=torch.float64), x.cpu(), mask.cpu())
                    row[f"{b}_ms"] = ms
                    row[f"{b}_tflops"] = 2.0 * n * d * d / ms / 1e9
                    row[f"{b}_rel_err"] = _rel_err_upper(cov.cpu(), spec)
                if "torch_ms" in row:
                    for b in backends:
                        row[f"{b}_speedup"] = row["torch_ms"] / row[f"{b}_ms"]
                rows.append(row)
                print("  " + "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in row.items()), flush=True)
    name = torch.cuda.get_device_name(dev)
    meta = dict(device=name, torch=torch.__version__, cuda=torch.version.cuda,
                date=_dt.datetime.now().isoformat(timespec="seconds"),
                note="TFLOP/s counts 2*n*d^2; do_bench medians (ms)")
    out = os.path.join(_ROOT, "results", f"cov_update_gpu_{_slug(name)}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\nwrote {out}\n\ncov_update on {name}: ms (TFLOP/s) [speed-up vs torch]")
    for r in rows:
        cells = "  ".join(f"{b}: {r[f'{b}_ms']:.3f} ({r[f'{b}_tflops']:.1f}) [x{r.get(f'{b}_speedup', float('nan')):.2f}]"
                          for b in backends)
        print(f"{r['dtype']:8s} n={r['n']:6d} d={r['d']:5d}  {cells}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="cuda vs triton vs torch on CUDA tensors")
    p.add_argument("--quick", action="store_true", help="d in {384, 1024} only")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    run_gpu(args) if args.gpu else run_cpu(args)


if __name__ == "__main__":
    main()
