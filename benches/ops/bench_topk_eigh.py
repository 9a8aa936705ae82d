"""GPU benchmark of one warm-started ``eva_kernels.topk_eigh`` step, per backend (Triton vs torch).

For d in {1024, 4096, 8192, 14336}: a PSD fp32 covariance (upper triangle stored, centred with
colsum/count) of n = min(4 d, 8192) tokens with a decaying spectrum and a non-zero mean,
k=16, oversample 8, iters 2, warm-started from the previous basis -- the per-batch tracking
call of EVA. Providers: every backend of ``eva_kernels.available_backends(device, "topk_eigh")``.
Median times (``triton.testing.do_bench``) of

* ``ms_<backend>``: the whole call;
* its heavy pieces, from the backend's ``eva_kernels.get_backend(name).topk_eigh`` products:
  ``sym_ms_<backend>`` (``prepare``: the symmetric operand from the upper triangle),
  ``matmul_ms_<backend>`` (``matmul``: the centred product with the (d, k + oversample) block)
  and ``orth_ms_<backend>`` (``eva_kernels.orthonormalize`` of that product with
  ``--orthonormalization``, shared by every backend);

and ``overlap_<backend>``: the subspace overlap (mean squared cosine, 1 = same span) of the
backend's top-k with a reference computed by the torch backend with 30 iterations;
``speedup`` = ms_torch / ms_triton. Writes ``benches/results/eigen_step_<gpu>.json``.

Run from the repository root:
    python -m benches.ops.bench_topk_eigh [--quick] [--k 16] [--oversample 8] [--iters 2]
    python -m benches.ops.bench_topk_eigh --dry-run    (smoke test: CPU, Triton interpreter, tiny)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from benches import harness
from benches.harness import Setup

SCRIPT = "python -m benches.ops.bench_topk_eigh"


def parse_args(argv=None):
    p = harness.parser(__doc__, SCRIPT, quick="d in 1024/8192 only")
    p.add_argument("--d", type=harness.int_list, default=None, help="comma list of sizes d")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--orthonormalization", default="auto", choices=["auto", "householder", "cholesky_qr3"],
                   help="of the eigensolver (default auto: by device)")
    return p.parse_args(argv)


class Problem(NamedTuple):
    """One case: the accumulated statistic and the reference top-k eigenvectors."""
    cov: torch.Tensor
    colsum: torch.Tensor
    count: torch.Tensor
    ref: torch.Tensor


def main(argv=None):
    args = parse_args(argv)
    dev = harness.gpu_device(args, SCRIPT)
    import eva_kernels

    backends = eva_kernels.available_backends(dev, "topk_eigh")
    if "triton" not in backends:
        print(f"note: triton topk_eigh unavailable on {dev}; benchmarking {backends}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    ds = args.d or ([40, 70] if args.dry_run else ([1024, 8192] if args.quick else [1024, 4096, 8192, 14336]))
    k, p = (min(args.k, 8), min(args.oversample, 4)) if args.dry_run else (args.k, args.oversample)
    method = eva_kernels.orthonormalization_for(dev, args.orthonormalization)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)

    def make_inputs(case) -> Problem:
        d = case["d"]
        scale = 0.97 ** torch.arange(d, device=dev, dtype=torch.float32)
        x = torch.randn(min(4 * d, 8192), d, device=dev, generator=gen) * scale + 0.3
        cov = torch.zeros(d, d, device=dev)
        colsum = torch.zeros(d, device=dev)
        count = eva_kernels.cov_update(cov, colsum, x, backend="torch")
        ref = eva_kernels.topk_eigh(cov, k, colsum=colsum, count=count, oversample=p, iters=30, backend="torch")
        return Problem(cov, colsum, count, ref.eigenvectors)

    def provider(name: str):
        products = eva_kernels.get_backend(name).topk_eigh

        def setup(pb: Problem) -> Setup:
            common = dict(colsum=pb.colsum, count=pb.count, oversample=p, backend=name, orthonormalization=method)
            prev = eva_kernels.topk_eigh_step(pb.cov, k, iters=1, return_basis=True, seed=1, **common)

            def call():
                return eva_kernels.topk_eigh_step(pb.cov, k, init=prev.basis, iters=args.iters, **common)
            operand = products.prepare(pb.cov)
            q = prev.basis.mT.contiguous()
            y = products.matmul(operand, q, pb.colsum, pb.count)
            overlap = float(eva_kernels.subspace_overlap(call().eigenvectors, pb.ref))
            return Setup({"ms": call, "sym_ms": lambda: products.prepare(pb.cov),
                          "matmul_ms": lambda: products.matmul(operand, q, pb.colsum, pb.count),
                          "orth_ms": lambda: eva_kernels.orthonormalize(y, method)},
                         {"overlap": overlap})
        return setup

    def derive(row):
        return {"speedup": row["ms_torch"] / row["ms_triton"]} if "ms_triton" in row else {}

    cases = [{"d": d, "k": k, "b": k + p, "iters": args.iters} for d in ds]
    rows = harness.run_grid(cases, make_inputs, {b: provider(b) for b in backends},
                            harness.Timer(dev, dry_run=args.dry_run), key="{metric}_{provider}", derive=derive)
    env = dict(harness.environment(dev), orthonormalization=method, backends=backends,
               triton_fp32_dot=harness.backend_info("triton", "fp32_dot"))
    out = args.out or harness.default_out("eigen_step", dev, partial=args.quick or args.dry_run)
    cols = ["d", "k", "b", "iters", "ms_triton", "ms_torch", "speedup", "sym_ms_triton", "sym_ms_torch",
            "matmul_ms_triton", "matmul_ms_torch", "orth_ms_triton", "orth_ms_torch", "overlap_triton", "overlap_torch"]
    harness.report(out, {"bench": "eigen_step", "env": env, "rows": rows}, rows, cols,
                   f"warm-started topk_eigh step on {env['device']} (orthonormalization {method}); times in ms")


if __name__ == "__main__":
    main()
