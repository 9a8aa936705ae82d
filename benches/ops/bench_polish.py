"""The final polish: products and time to a residual tolerance, per Krylov depth.

A polish solves each layer's covariance to ``||A v - theta v|| <= tol * theta_1`` for its top
``k`` pairs, warm-started from the streaming estimate. Matrices here: the scatter of ``N``
Gaussian tokens (``N = 3072``: 6 batches of 2 x 256, as ``bench_llm_width``) in ``d`` features
with mildly unequal scales, whose top spectrum is as flat as random-weight activations'
(``lambda_k / lambda_{b+1}`` about 1.01 to 1.1), and (``--spectra decaying``) a power law
``lambda_i ~ i^-1``, closer to trained models. Warm start: 12 subspace iterations from a
Gaussian block (as 6 streaming steps of 2). Then for each ``krylov_depth``:

* ``products``: products ``A Q`` (each ``d x d x b``) until the test passed (cap ``--max-iters``);
* ``ms``: the polish's time (median of ``--repeats``; ``torch`` products, the engine's CPU path
  is the same algorithm);
* ``max_resid``: the largest wanted residual over ``theta_1``, in float64 from the result;
* ``speedup``: depth 1's time over this depth's, in the same run.

On CUDA, ``--batched G`` also times ``G`` matrices of one width polished together
(:class:`eva_kernels.SubspaceBatch`, host Rayleigh-Ritz: what the engine's GPU default runs).

Run from the repository root:
    python -m benches.ops.bench_polish                         (CPU: d = 1024, 4096)
    python -m benches.ops.bench_polish --device cuda --d 4096,14336 --batched 8
    python -m benches.ops.bench_polish --dry-run               (tiny, a smoke test)
"""
from __future__ import annotations

import torch

from benches import harness

SCRIPT = "python -m benches.ops.bench_polish"


def parse_args(argv=None):
    p = harness.parser(__doc__, SCRIPT, quick="d = 1024 only, one repeat")
    p.add_argument("--device", default="cpu")
    p.add_argument("--d", type=harness.int_list, default=None, help="comma list of widths")
    p.add_argument("--depths", type=harness.int_list, default=[1, 4, 8])
    p.add_argument("--spectra", default="flat", help="comma list of: flat, decaying")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--tokens", type=int, default=3072)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batched", type=int, default=0, help="CUDA: also polish G matrices together")
    return p.parse_args(argv)


def matrix(d: int, tokens: int, spectrum: str, device: str, seed: int) -> torch.Tensor:
    """(d, d) fp32 symmetric PSD test matrix (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if spectrum == "flat":
        x = torch.randn(tokens, d, generator=gen) * (0.5 + torch.rand(d, generator=gen))
        return (x.mT @ x).to(device)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    lam = 1.0 / torch.arange(1, d + 1, dtype=torch.float32)
    return ((q * lam) @ q.mT).to(device)


def warm_start(a: torch.Tensor, b: int, steps: int = 12) -> torch.Tensor:
    """(b, d) rows after ``steps`` subspace iterations from a Gaussian block."""
    gen = torch.Generator(device=a.device).manual_seed(1)
    q = torch.randn(a.shape[0], b, generator=gen, device=a.device)
    for _ in range(steps):
        q, _ = torch.linalg.qr(a @ q)
    return q.mT.contiguous()


def max_residual(a: torch.Tensor, vals: torch.Tensor, vecs: torch.Tensor) -> float:
    a64, v, th = a.double(), vecs.double(), vals.double()
    return float(((v @ a64 - th[:, None] * v).norm(dim=1) / th[0]).max())


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        harness.setup_dry_run()
        args.device, args.repeats, args.k = "cpu", 1, 8
    import eva_kernels
    dev = args.device
    widths = args.d or ([96] if args.dry_run else [1024] if args.quick else [1024, 4096])
    repeats = 1 if args.quick else args.repeats
    timer = harness.Timer(dev, dry_run=args.dry_run)
    b = args.k + args.oversample
    rows = []
    for spectrum in args.spectra.split(","):
        for d in widths:
            a = matrix(d, args.tokens if not args.dry_run else 300, spectrum, dev, seed=d)
            init = warm_start(a, b)
            base = None
            for depth in args.depths:
                count = [0]

                def counted(y):
                    count[0] += 1
                    return y

                def solve():
                    count[0] = 0
                    return eva_kernels.topk_eigh(a, args.k, init=init, oversample=args.oversample, iters=1,
                                                 tol=args.tol, max_iters=args.max_iters, krylov_depth=depth,
                                                 reduce=counted, backend="torch")
                res = solve()
                ms = 1e3 * timer.median_s(solve, repeats)
                base = ms if depth == args.depths[0] else base
                row = {"spectrum": spectrum, "d": d, "k": args.k, "b": b, "depth": depth,
                       "usable_depth": eva_kernels.block_krylov.usable_depth(d, b, depth), "products": count[0],
                       "ms": ms, "max_resid": max_residual(a, res.eigenvalues, res.eigenvectors),
                       "speedup": base / ms}
                if args.batched and dev.startswith("cuda"):
                    row.update(batched(a, init, args, depth, timer, repeats))
                rows.append(row)
                print(" ".join(f"{k}={harness.fmt(v)}" for k, v in row.items()), flush=True)
            a = None  # free the matrix before the next width (the closures above are done with it)
            timer.free()
    env = harness.environment(dev)
    out = args.out or harness.default_out("polish", dev, partial=args.quick or args.dry_run)
    harness.report(out, {"bench": "polish", "env": env, "command": f"{SCRIPT} {' '.join(argv or [])}".strip(),
                         "setting": vars(args), "rows": rows}, rows,
                   ["spectrum", "d", "depth", "usable_depth", "products", "ms", "speedup", "max_resid",
                    "batched_ms", "batched_rounds"],
                   f"polish to tol={args.tol} (k={args.k}, b={b}) on {env['device']}")


def batched(a, init, args, depth, timer, repeats) -> dict:
    """``G`` copies of ``a`` polished together, Rayleigh-Ritz on the host (the engine's CUDA path)."""
    import eva_kernels

    def solve():
        batch = eva_kernels.SubspaceBatch([a] * args.batched, args.k, inits=[init] * args.batched,
                                          oversample=args.oversample, iters=1, method="cholesky_qr3",
                                          tol=args.tol, max_iters=args.max_iters, krylov_depth=depth)
        return eva_kernels.solve_batches([batch], "host")
    rounds = solve()
    return {"batched_G": args.batched, "batched_ms": 1e3 * timer.median_s(solve, repeats), "batched_rounds": rounds}


if __name__ == "__main__":
    main()
