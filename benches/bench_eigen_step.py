"""GPU benchmark of one warm-started ``topk_eigh`` step: Triton vs torch ``eigen_steps``.

For d in {1024, 4096, 8192, 14336}: a PSD fp32 covariance (upper triangle stored, centred with
colsum/count), k=16, oversample 8, iters 2, warm-started from the previous basis -- the
per-batch tracking call of EVA. Median times by ``triton.testing.do_bench`` of the whole call
and of its heavy pieces (symmetrize, operator_matmul, orthonormalize), and the subspace overlap
(mean squared cosine, 1 = same span) of each backend's top-k with a reference computed by\nthe torch backend with 30 iterations.

Usage (GPU):   python benches/bench_eigen_step.py [--quick] [--out PATH]
Smoke test:    python benches/bench_eigen_step.py --dry-run   (CPU, Triton interpreter, tiny)
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_utils as bu  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="d in 1024/8192 only")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--out", default=None, help="JSON path (default benches/results/eigen_step_<device>.json)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--iters", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        bu.setup_dry_run()
    else:
        bu.require_cuda("bench_eigen_step.py")
    import torch
    import eva_kernels
    from eva_kernels import _backends

    dev = "cpu" if args.dry_run else "cuda"
    reason = _backends.why_unavailable("eigen_steps", "triton", dev)
    if reason is not None:
        from eva_kernels import _optional_backends
        sys.exit(f"bench_eigen_step.py: triton eigen_steps unavailable on {dev}: {reason} "
                 f"{_optional_backends.LOAD_ERRORS.get('triton', '')}")
    torch.backends.cuda.matmul.allow_tf32 = False

    ds = [40, 70] if args.dry_run else ([1024, 8192] if args.quick else [1024, 4096, 8192, 14336])
    k, p, iters = (min(args.k, 8), min(args.oversample, 4), args.iters) if args.dry_run else \
        (args.k, args.oversample, args.iters)
    b = k + p

    def timed(fn):
        return bu.bench_ms(fn, args.dry_run)

    rows = []
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    for d in ds:
        n = min(4 * d, 8192)
        # tokens with a decaying spectrum and a non-zero mean, accumulated like EVA does
        scale = 0.97 ** torch.arange(d, device=dev, dtype=torch.float32)
        x = torch.randn(n, d, device=dev, generator=gen) * scale + 0.3
        cov = torch.zeros(d, d, device=dev)
        colsum = torch.zeros(d, device=dev)
        count = eva_kernels.cov_update(cov, colsum, x, backend="torch")
        del x
        ref = eva_kernels.topk_eigh(cov, k, colsum=colsum, count=count, oversample=p, iters=30,
                                    backend="torch")
        row = {"d": d, "k": k, "b": b, "iters": iters}
        for name in ("triton", "torch"):
            steps = _backends.get("eigen_steps", name)
            prev = eva_kernels.topk_eigh(cov, k, colsum=colsum, count=count, oversample=p, iters=1,
                                         return_basis=True, backend=name, seed=1)

            def call(name=name, prev=prev):
                return eva_kernels.topk_eigh(cov, k, colsum=colsum, count=count, init=prev.basis,
                                             oversample=p, iters=iters, backend=name)
            res = call()
            row[f"ms_{name}"] = timed(call)
            row[f"overlap_{name}"] = float(eva_kernels.subspace_overlap(res.eigenvectors, ref.eigenvectors))
            a_full = steps.symmetrize(cov)
            q = prev.basis.mT.contiguous()
            y = steps.operator_matmul(a_full, q, colsum, count)
            row[f"sym_ms_{name}"] = timed(lambda s=steps: s.symmetrize(cov))
            row[f"matmul_ms_{name}"] = timed(lambda s=steps: s.operator_matmul(a_full, q, colsum, count))
            row[f"orth_ms_{name}"] = timed(lambda s=steps: s.orthonormalize(y))
            del a_full
        row["speedup"] = row["ms_torch"] / row["ms_triton"]
        rows.append(row)
        print(" ".join(f"{kk}={bu._fmt(v)}" for kk, v in row.items()), flush=True)
        del cov
        if dev == "cuda":
            torch.cuda.empty_cache()

    env = bu.environment(dev)
    out = args.out or (os.path.join("/tmp", "eigen_step_dryrun.json") if args.dry_run
                       else bu.default_out("eigen_step", dev))
    bu.write_json(out, {"bench": "eigen_step", "env": env, "rows": rows})
    print(f"\nwrote {out}")
    cols = ["d", "k", "b", "iters", "ms_triton", "ms_torch", "speedup", "sym_ms_triton", "sym_ms_torch",
            "matmul_ms_triton", "matmul_ms_torch", "orth_ms_triton", "orth_ms_torch",
            "overlap_triton", "overlap_torch"]
    bu.print_table(rows, cols, title=f"warm-started topk_eigh step on {env['device']}; times in ms")


if __name__ == "__main__":
    main()
