"""A GPTQ-style Hessian ``H += X^T X`` on CPU: ``eva_kernels.cov_update`` against ``H.addmm_``.

What a quantizer does per calibration batch of a layer, with the batch's padding dropped by a
mask (``--keep``, default 0.9 of the rows):

* ``addmm``: ``xk = x[mask].float()`` (a gathered fp32 copy of the kept rows), then
  ``H.addmm_(xk.T, xk)`` (the full d x d product);
* ``cov_update`` on each available backend (``cpp``: the C++ kernel; ``torch``: upcast +
  ``addmm`` as the reference): the mask and the widening fused, the upper triangle only, plus
  the column sums; ``symmetric_from_upper`` once at the end is not timed (once per layer).

Per row: milliseconds (interleaved medians), ``speedup`` = addmm / the first kernel backend, the
error of each against float64 ``X^T X`` (max entry error / max entry), and ``temp_MB``: the
temporary bytes the ``addmm`` route allocates per batch (the gathered fp32 rows) that the fused
kernel does not. Writes ``benches/results/hessian_cpu_<cpu>.json``.

    python -m benches.ops.bench_hessian [--quick] [--repeats 7] [--keep 0.9]
"""
from __future__ import annotations

import sys

import torch

from benches import harness
from benches.harness import Setup

SCRIPT = "python -m benches.ops.bench_hessian"


def main(argv=None) -> int:
    p = harness.parser(__doc__, SCRIPT, dry_run=False)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--keep", type=float, default=0.9, help="fraction of rows kept by the mask")
    args = p.parse_args(argv)
    import eva_kernels
    backends = [b for b in ("cpp", "torch") if b in eva_kernels.available_backends("cpu")]
    ds, ns = ([512, 2048], [1024]) if args.quick else ([1024, 2048, 4096], [2048])
    gen = torch.Generator().manual_seed(0)

    def make_inputs(case):
        x = torch.randn(case["n"], case["d"], generator=gen).to(getattr(torch, case["dtype"]))
        mask = torch.rand(case["n"], generator=gen) < args.keep
        xk = x[mask].double()
        return x, mask, xk.T @ xk

    def rel(h, exact):
        return float((h.double() - exact).abs().max() / exact.abs().max())

    def addmm(inp) -> Setup:
        x, mask, exact = inp
        h = torch.zeros(x.shape[1], x.shape[1])

        def run():
            xk = x[mask].float()
            h.addmm_(xk.T, xk)
        run()
        err = rel(h, exact)
        return Setup({"ms": run}, {"rel_err": err, "temp_MB": int(mask.sum()) * x.shape[1] * 4 / 2**20})

    def kernel(name):
        def setup(inp) -> Setup:
            x, mask, exact = inp
            d = x.shape[1]
            h, col = torch.zeros(d, d), torch.zeros(d)
            eva_kernels.cov_update(h, col, x, mask, backend=name)
            err = rel(eva_kernels.symmetric_from_upper(h), exact)
            return Setup({"ms": lambda: eva_kernels.cov_update(h, col, x, mask, backend=name)}, {"rel_err": err})
        return setup

    providers = {"addmm": addmm, **{b: kernel(b) for b in backends}}
    timer = harness.Timer("cpu", repeats=args.repeats)

    def derive(row):
        return {"speedup": row["addmm_ms"] / row[f"{backends[0]}_ms"]}
    rows = harness.run_grid(harness.grid(dtype=["float32", "bfloat16"], n=ns, d=ds), make_inputs, providers,
                            timer, derive=derive)
    env = harness.environment("cpu")
    out = args.out or harness.default_out("hessian_cpu", "cpu", partial=args.quick)
    cols = (["dtype", "n", "d", "addmm_ms"] + [f"{b}_ms" for b in backends] + ["speedup", "addmm_temp_MB",
            "addmm_rel_err"] + [f"{b}_rel_err" for b in backends])
    harness.report(out, {"environment": dict(env, threads=torch.get_num_threads(), keep=args.keep,
                                             cpu_isa=harness.backend_info("cpp", "cpu_isa")), "rows": rows},
                   rows, cols, f"H += X^T X on {env['device']} ({torch.get_num_threads()} threads, mask keeps "
                               f"{args.keep:.0%}); speedup = addmm / {backends[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
