"""One product ``A_g Q_g`` of a streaming step for ``G`` statistics of width ``d``, both ways the
batched solves can take (:mod:`eva_kernels.ops.batch_operand`):

* ``mirror_ms``: what a step costs with ``products="mirror"``: the symmetric copies stacked
  (once per step) plus ``iters = 2`` batched GEMMs, divided by 2: per product;
* ``upper_ms``: ``products="upper"``: the Triton kernel reading each upper triangle in place, per
  product (no copy);
* ``upper_gbps``: ``4 d^2 G`` bytes (each fp32 statistic read once, as the issue's floor counts
  it) over ``upper_ms``; compare with the GPU's memory bandwidth (H100 SXM: 3.35 TB/s);
* ``max_err``: the largest difference of the two products relative to the largest entry.

Shapes: ``b = 40`` (r = 16, rho = 2, oversample 8), centred; d in {4096, 14336} (Llama-3.1-8B's
widths), G = 8 by default. Writes ``benches/results/batched_products_<gpu>.json``.

Run from the repository root:
    python -m benches.ops.bench_batched_products [--d 4096,14336] [--groups 8]
    python -m benches.ops.bench_batched_products --dry-run    (smoke test on CPU, tiny, interpreter)
"""
from __future__ import annotations

import torch

from benches import harness
from benches.harness import Setup

SCRIPT = "python -m benches.ops.bench_batched_products"
ITERS = 2  # products per streaming step (EvaOptions.iters)


def parse_args(argv=None):
    p = harness.parser(__doc__, SCRIPT, quick="d = 4096 only")
    p.add_argument("--d", type=harness.int_list, default=None, help="comma list of widths")
    p.add_argument("--groups", type=int, default=None, help="statistics per width (G)")
    p.add_argument("--b", type=int, default=40, help="block columns")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dev = harness.gpu_device(args, SCRIPT)
    from eva_kernels.ops.batch_operand import MirroredStack, UpperInPlace

    ds = args.d or ([48, 67] if args.dry_run else ([4096] if args.quick else [4096, 14336]))
    groups = args.groups or (2 if args.dry_run else 8)
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)

    def make_inputs(case):
        d, g = case["d"], case["G"]
        covs = [torch.randn(d, d, device=dev, generator=gen) for _ in range(g)]  # only the upper triangle counts
        q = torch.randn(g, d, args.b, device=dev, generator=gen)
        c = torch.randn(g, d, device=dev, generator=gen)
        n = torch.full((g,), 1000.0, device=dev)
        return covs, q, c, n

    def mirror(inputs):
        covs, q, c, n = inputs

        def step():
            op = MirroredStack(covs)
            for _ in range(ITERS):
                op.matmul(q, c, n)
        return Setup({"mirror_step_ms": step}, {})

    def upper(inputs):
        covs, q, c, n = inputs
        op = UpperInPlace(covs)
        ref = MirroredStack(covs).matmul(q, c, n)
        err = float((op.matmul(q, c, n) - ref).abs().max() / ref.abs().max())
        return Setup({"upper_ms": lambda: op.matmul(q, c, n)}, {"max_err": err})

    def derive(row):
        out = {}
        if row.get("mirror_step_ms") is not None:
            out["mirror_ms"] = row["mirror_step_ms"] / ITERS
        if row.get("upper_ms"):
            out["upper_gbps"] = 4 * row["d"] ** 2 * row["G"] / (row["upper_ms"] * 1e-3) / 1e9
            if "mirror_ms" in out:
                out["upper_speedup"] = out["mirror_ms"] / row["upper_ms"]
        return out

    cases = [{"d": d, "G": groups, "b": args.b} for d in ds]
    rows = harness.run_grid(cases, make_inputs, {"mirror": mirror, "upper": upper},
                            harness.Timer(dev, dry_run=args.dry_run), key="{metric}", derive=derive)
    env = harness.environment(dev)
    out = args.out or harness.default_out("batched_products", dev, partial=args.quick or args.dry_run)
    harness.report(out, {"bench": "batched_products", "env": env, "rows": rows}, rows,
                   ["d", "G", "b", "mirror_ms", "upper_ms", "upper_speedup", "upper_gbps", "max_err"],
                   f"one batched product per statistic on {env['device']}: symmetric copies vs in place; ms")


if __name__ == "__main__":
    main()
