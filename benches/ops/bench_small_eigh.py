"""The small eigenproblems of a round of batched solves: ``B`` symmetric ``b x b`` matrices.

For B in {16, 128} and b in {24, 32, 40, 64, 128} (cuSOLVER's batched Jacobi, which
``torch.linalg.eigh`` uses on CUDA, stops at n = 32; beyond, it loops matrix by matrix with a
host sync), median times (``triton.testing.do_bench`` on a GPU) of

* ``device_ms``: ``torch.linalg.eigh`` of the (B, b, b) fp32 stack on the device (what
  ``rayleigh_ritz="device"`` does);
* ``host_ms``: the host route of ``rayleigh_ritz="host"`` (:mod:`eva_kernels.ops.subspace_batch`):
  the stack to the host as float64 (one transfer), ``torch.linalg.eigh`` there, the eigenpairs
  back to the device as fp32;
* ``max_err``: the largest eigenvalue difference of the two, relative to the largest eigenvalue.

``host_speedup`` = device_ms / host_ms. Writes ``benches/results/small_eigh_<gpu>.json``.

Run from the repository root:
    python -m benches.ops.bench_small_eigh [--quick]
    python -m benches.ops.bench_small_eigh --dry-run    (smoke test on CPU, tiny)
"""
from __future__ import annotations

import torch

from benches import harness
from benches.harness import Setup

SCRIPT = "python -m benches.ops.bench_small_eigh"


def parse_args(argv=None):
    p = harness.parser(__doc__, SCRIPT, quick="B = 128 only")
    p.add_argument("--b", type=harness.int_list, default=None, help="comma list of block sizes b")
    p.add_argument("--batch", type=harness.int_list, default=None, help="comma list of batch sizes B")
    return p.parse_args(argv)


def _stack(batch: int, b: int, device: str, gen: torch.Generator) -> torch.Tensor:
    """(B, b, b) symmetric PSD fp32 matrices with decaying spectra (Rayleigh quotients look so)."""
    x = torch.randn(batch, b, b, device=device, generator=gen)
    q, _ = torch.linalg.qr(x)
    lam = 0.8 ** torch.arange(b, device=device, dtype=torch.float32)
    return (q * lam) @ q.mT


def _host_route(t: torch.Tensor):
    """The host route: one transfer, eigh in float64 on the host, the pairs back as fp32."""
    host = t.to("cpu", torch.float64, copy=True)
    vals, vecs = torch.linalg.eigh(host)
    return vals.to(t.device, torch.float32), vecs.to(t.device, torch.float32)


def main(argv=None):
    args = parse_args(argv)
    dev = harness.gpu_device(args, SCRIPT)
    bs = args.b or ([24, 40] if args.dry_run else [24, 32, 40, 64, 128])
    batches = args.batch or ([4] if args.dry_run else ([128] if args.quick else [16, 128]))
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)

    def make_inputs(case):
        return _stack(case["B"], case["b"], dev, gen)

    def device_route(t):
        return Setup({"device_ms": lambda: torch.linalg.eigh(t)}, {})

    def host_route(t):
        err = float((torch.linalg.eigh(t)[0].double() - _host_route(t)[0].double()).abs().max() / t.diagonal(
            dim1=-2, dim2=-1).sum(-1).max())
        return Setup({"host_ms": lambda: _host_route(t)}, {"max_err": err})

    def derive(row):
        return {"host_speedup": row["device_ms"] / row["host_ms"]} if row.get("host_ms") else {}

    cases = [{"B": n, "b": b} for n in batches for b in bs]
    rows = harness.run_grid(cases, make_inputs, {"device": device_route, "host": host_route},
                            harness.Timer(dev, dry_run=args.dry_run), key="{metric}", derive=derive)
    env = harness.environment(dev)
    out = args.out or harness.default_out("small_eigh", dev, partial=args.quick or args.dry_run)
    harness.report(out, {"bench": "small_eigh", "env": env, "rows": rows}, rows,
                   ["B", "b", "device_ms", "host_ms", "host_speedup", "max_err"],
                   f"B x (b, b) symmetric eigh on {env['device']}: device vs the host route; times in ms")


if __name__ == "__main__":
    main()
