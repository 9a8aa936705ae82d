"""GPU benchmark of ``eva_kernels.cov_update`` (Triton) against plain-PyTorch ways to do it.

For each input dtype (bf16, fp32), d in {1024, 2048, 4096, 8192, 14336} and n in
{512, 2048, 8192}, with a random mask keeping ~90% of the rows (mask + colsum + count included
in every timing), median times by ``triton.testing.do_bench`` of:

* ``triton``  : eva_kernels.cov_update(..., backend="triton") (upper triangle only, fused)
* ``fp32``    : reference.cov_update_torch (torch.where mask on the fp32 upcast, fp32 addmm)
* ``tf32``    : the same with torch.backends.cuda.matmul.allow_tf32 = True
* ``bf16``    : mask in bf16, bf16 GEMM with fp32 output added into the fp32 covariance:
                torch.addmm(cov, xm.T, xm, out_dtype=float32, out=cov) when this torch accepts it,
                else the same into a new tensor copied back, else bf16 GEMM then upcast + add

and the bf16 dense GEMM peak (8192^3) measured in the same run. TFLOP/s counts 2 n d^2 (what a
GEMM of the same shape would count) although the kernel computes only the upper triangle; the
"useful" rate n d (d + 1) / s (the upper-triangle multiply-adds) is given as % of the bf16 peak.
Error = max|cov - ref| / max|ref| on the upper triangle, float64 reference, for n <= 2048.

Usage (GPU):   python benches/bench_cov_update.py [--quick] [--out PATH]
Smoke test:    python benches/bench_cov_update.py --dry-run   (CPU, Triton interpreter, tiny)
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as bu  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes (d in 1024/4096/14336, n in 512/8192)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help="JSON path (default benches/results/cov_update_<device>.json)")
    p.add_argument("--keep", type=float, default=0.9, help="fraction of rows kept by the mask")
    p.add_argument("--error-max-n", type=int, default=2048, help="compute errors for n up to this")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        bu.setup_dry_run()  # before triton / eva_kernels are imported
    else:
        bu.require_cuda("bench_cov_update.py")
    import torch
    import eva_kernels
    from eva_kernels.reference import cov_update_torch

    dev = "cpu" if args.dry_run else "cuda"
    if "triton" not in eva_kernels.available_backends(dev):
        from eva_kernels import _optional_backends
        sys.exit(f"bench_cov_update.py: triton backend unavailable on {dev}: "
                 f"{_optional_backends.LOAD_ERRORS.get('triton', 'see eva_kernels.available_backends()')}")

    if args.dry_run:
        ds, ns, dtypes = [33, 70], [50], [torch.bfloat16, torch.float32]
    elif args.quick:
        ds, ns, dtypes = [1024, 4096, 14336], [512, 8192], [torch.bfloat16, torch.float32]
    else:
        ds, ns, dtypes = [1024, 2048, 4096, 8192, 14336], [512, 2048, 8192], [torch.bfloat16, torch.float32]

    def timed(fn):
        return bu.bench_ms(fn, args.dry_run)

    # ---- measured bf16 GEMM peak -------------------------------------------------------
    m = 256 if args.dry_run else 8192
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    bmat = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    peak_ms = timed(lambda: a @ bmat)
    peak_tflops = 2 * m ** 3 / (peak_ms * 1e-3) / 1e12
    del a, bmat
    print(f"bf16 GEMM {m}^3: {peak_ms:.3f} ms = {peak_tflops:.1f} TFLOP/s (measured peak)", flush=True)

    has_out_dtype = _addmm_out_dtype_mode(torch, dev)  # "inplace", "copy" or ""

    def bf16_gemm(cov, colsum, x, mask):
        xm = torch.where(mask.unsqueeze(1), x.to(torch.bfloat16), x.new_zeros((), dtype=torch.bfloat16))
        if has_out_dtype == "inplace":
            torch.addmm(cov, xm.mT, xm, out_dtype=torch.float32, out=cov)
        elif has_out_dtype == "copy":
            cov.copy_(torch.addmm(cov, xm.mT, xm, out_dtype=torch.float32))
        else:
            cov.add_((xm.mT @ xm).float())
        colsum.add_(xm.float().sum(0))
        return mask.sum(dtype=torch.int64)

    def tf32(cov, colsum, x, mask):
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return cov_update_torch(cov, colsum, x, mask, None)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old

    methods = {
        "triton": lambda c, s, x, mk: eva_kernels.cov_update(c, s, x, mk, backend="triton"),
        "fp32": lambda c, s, x, mk: cov_update_torch(c, s, x, mk, None),
        "tf32": tf32,
        "bf16": bf16_gemm,
    }
    torch.backends.cuda.matmul.allow_tf32 = False

    rows = []
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    for dtype in dtypes:
        for d in ds:
            for n in ns:
                x = torch.randn(n, d, device=dev, generator=gen).to(dtype)
                mask = torch.rand(n, device=dev, generator=gen) < args.keep
                row = {"dtype": str(dtype).replace("torch.", ""), "d": d, "n": n}
                if n <= args.error_max_n:
                    ref = _ref_cov(torch, x, mask)
                    for name, fn in methods.items():
                        cov = torch.zeros(d, d, device=dev)
                        fn(cov, torch.zeros(d, device=dev), x, mask)
                        row[f"err_{name}"] = _rel_err_upper(torch, cov, ref)
                    del ref
                cov = torch.zeros(d, d, device=dev)
                colsum = torch.zeros(d, device=dev)
                for name, fn in methods.items():
                    fn(cov, colsum, x, mask)  # compile / autotune outside the timing
                    row[f"ms_{name}"] = timed(lambda fn=fn: fn(cov, colsum, x, mask))
                t = row["ms_triton"] * 1e-3
                row["TFLOP/s"] = 2 * n * d * d / t / 1e12
                row["useful_%peak"] = 100 * (n * d * (d + 1) / t / 1e12) / peak_tflops
                for base in ("fp32", "tf32", "bf16"):
                    row[f"x_vs_{base}"] = row[f"ms_{base}"] / row["ms_triton"]
                rows.append(row)
                print(" ".join(f"{k}={bu._fmt(v)}" for k, v in row.items()), flush=True)
                del x, mask, cov, colsum
                if dev == "cuda":
                    torch.cuda.empty_cache()

    env = bu.environment(dev)
    env["bf16_peak_tflops"] = peak_tflops
    env["bf16_baseline_mode"] = has_out_dtype or "bf16-gemm-then-upcast"
    from eva_kernels.triton_backend import FP32_DOT_PRECISION
    env["triton_fp32_dot"] = FP32_DOT_PRECISION
    out = args.out or (os.path.join("/tmp", "cov_update_dryrun.json") if args.dry_run
                       else bu.default_out("cov_update", dev))
    bu.write_json(out, {"bench": "cov_update", "env": env, "keep": args.keep, "rows": rows})
    cols = ["dtype", "d", "n", "ms_triton", "TFLOP/s", "useful_%peak", "x_vs_fp32", "x_vs_tf32",
            "x_vs_bf16", "ms_fp32", "ms_tf32", "ms_bf16", "err_triton", "err_fp32", "err_tf32", "err_bf16"]
    print(f"\nwrote {out}")
    bu.print_table(rows, cols, title=f"cov_update on {env['device']} (bf16 peak {peak_tflops:.0f} TFLOP/s, "
                                     f"mask keeps {args.keep:.0%}); times in ms")


def _addmm_out_dtype_mode(torch, dev) -> str:
    """How this torch can do fp32 += bf16 @ bf16: "inplace" (addmm out_dtype with out=cov),
    "copy" (addmm out_dtype into a new tensor) or "" (bf16 GEMM, then upcast)."""
    a = torch.randn(16, 16, device=dev).to(torch.bfloat16)
    c0 = torch.randn(16, 16, device=dev)
    want = c0 + a.float() @ a.float()
    try:
        c = c0.clone()
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
        if torch.allclose(c, want, rtol=1e-2, atol=1e-2):
            return "inplace"
    except Exception:  # noqa: BLE001
        pass
    try:
        r = torch.addmm(c0, a, a, out_dtype=torch.float32)
        if r.dtype == torch.float32 and torch.allclose(r, want, rtol=1e-2, atol=1e-2):
            return "copy"
    except Exception:  # noqa: BLE001
        pass
    return ""


def _ref_cov(torch, x, mask):
    y = torch.where(mask.unsqueeze(1), x.double(), x.new_zeros((), dtype=torch.float64))
    return y.mT @ y


def _rel_err_upper(torch, cov, ref) -> float:
    diff = torch.triu(cov.double() - ref).abs().max()
    return float(diff / torch.triu(ref).abs().max())


if __name__ == "__main__":
    main()
