"""Benchmark of ``eva_kernels.cov_update``: every backend against plain-PyTorch ways to do it.

Providers (one setup function each; all update an fp32 covariance and column sums in place):

* every backend of ``eva_kernels.available_backends(device)``: ``cpp`` (the C++/CUDA kernel,
  upper triangle only), ``triton`` (fused, upper triangle only), ``torch`` (upcast, then an
  fp32 ``addmm``: the reference every kernel is compared with);
* ``--device cuda`` only, two more PyTorch baselines: ``tf32`` (the torch backend with
  ``torch.backends.cuda.matmul.allow_tf32``) and ``bf16`` (mask in bf16, bf16 GEMM with fp32
  output added into the covariance: ``torch.addmm(cov, xm.T, xm, out_dtype=float32, out=cov)``
  when this torch accepts it, else the same into a new tensor copied back, else bf16 GEMM then
  upcast + add).

``--device cpu`` (default): fp32 and bf16 inputs, d in {384, 1024, 2048, 4096}, n in {512, 2048},
no mask; medians of ``--repeats`` wall-clock runs, the providers interleaved (d = 4096: half the
repeats, at least 3). GFLOP/s counts 2 n d^2 for every provider (the kernels compute only the
upper triangle, ~half of that). Writes ``benches/results/cov_update_cpu_<cpu>.json``.

``--device cuda``: bf16 and fp32 inputs, d in {1024, 2048, 4096, 8192, 14336}, n in
{512, 2048, 8192}, a random mask keeping ``--keep`` (0.9) of the rows (mask, column sums and
count included in every timing); ``triton.testing.do_bench`` medians, and the bf16 dense GEMM
peak (8192^3) measured in the same run. TFLOP/s counts 2 n d^2; ``useful_%peak`` is the
upper-triangle rate n d (d + 1) / s of the main backend (the one ``auto`` picks on the device)
as % of that peak. Writes ``benches/results/cov_update_gpu_<gpu>.json``.

Per row: ``<provider>_ms``, ``<provider>_gflops`` (CPU) or ``<provider>_tflops`` (CUDA),
``<provider>_rel_err`` = max |cov - spec| / max |spec| over the upper triangle against the
float64 spec ``eva_kernels.testing.cov_update_spec`` (for n <= ``--error-max-n``), ``speedup`` =
torch ms / main-backend ms, and on CUDA ``x_vs_tf32``, ``x_vs_bf16`` (baseline ms / main ms).

Run from the repository root:
    python -m benches.ops.bench_cov_update --device cpu [--quick] [--repeats 7] [--threads N]
    python -m benches.ops.bench_cov_update --device cuda [--quick] [--keep 0.9]
    python -m benches.ops.bench_cov_update --device cuda --dry-run    (smoke test: CPU, Triton interpreter, tiny)
``--d``/``--n`` replace the sizes (e.g. ``--device cuda --d 384,1024,2048,4096,8192 --n 2048,16384``).
``--shift none,mean`` adds the engine's case to the grid: a fp32 shift (the mean of the first 64
rows) subtracted from every row, which 16-bit input on the GPU kernels turns into the bf16 split
(three bf16 tensor-core products; fp32 input: tf32x3 / FMA as without a shift). The ``bf16``
baseline then rounds ``x - shift`` to bf16 (one GEMM, inexact: its ``rel_err`` shows by how much).
Where Triton runs, ``triton_fast`` is ``cov_update(..., precision="fast")`` (shifted 16-bit
input: one MMA per product, the shift taken out per 512 rows; elsewhere the same as ``triton``);
``fast_x_vs_bf16`` = bf16 GEMM ms / triton_fast ms (issue 22's goal: >= 1.43, i.e. <= 0.7x the
GEMM's time), and its ``rel_err`` is the fast path's measured error.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch

from benches import harness
from benches.harness import Setup

SCRIPT = "python -m benches.ops.bench_cov_update"
#: (d values, n values) per device and setting; dtypes per device
SIZES = {
    "cpu": {"full": ([384, 1024, 2048, 4096], [512, 2048]), "quick": ([384, 1024], [512, 2048])},
    "cuda": {"full": ([1024, 2048, 4096, 8192, 14336], [512, 2048, 8192]),
             "quick": ([1024, 4096, 14336], [512, 8192])},
    "dry-run": {"full": ([33, 70], [50])},
}
DTYPES = {"cpu": ["float32", "bfloat16"], "cuda": ["bfloat16", "float32"]}
BASELINES = ("tf32", "bf16")  # --device cuda only
RATE = {"cpu": ("gflops", 1e6, "GFLOP/s"), "cuda": ("tflops", 1e9, "TFLOP/s")}  # key, FLOP/ms per unit, label


def parse_args(argv=None):
    p = harness.parser(__doc__, SCRIPT,
                       quick="fewer sizes (cpu: d in 384/1024; cuda: d in 1024/4096/14336, n in 512/8192)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the tensors live (default cpu)")
    p.add_argument("--d", type=harness.int_list, default=None, help="comma list of feature sizes d")
    p.add_argument("--n", type=harness.int_list, default=None, help="comma list of row counts n")
    p.add_argument("--keep", type=float, default=None,
                   help="fraction of rows kept by a random mask (default: cpu 1 = no mask, cuda 0.9)")
    p.add_argument("--providers", default=None, help="comma list (default: all backends, + tf32,bf16 on cuda)")
    p.add_argument("--repeats", type=int, default=7, help="cpu: wall-clock runs per provider (median)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--error-max-n", type=int, default=2048, help="compute errors for n up to this")
    p.add_argument("--shift", default="none", help="comma list of none (no shift) / mean (the engine's "
                                                    "centring shift); default none")
    return p.parse_args(argv)


class Inputs(NamedTuple):
    """One case: rows ``x`` (n, d), ``mask`` (n,) bool or None, ``shift`` (d,) fp32 or None,
    float64 ``spec`` or None."""
    x: torch.Tensor
    mask: Optional[torch.Tensor]
    shift: Optional[torch.Tensor]
    spec: Optional[torch.Tensor]


# ------------------------------------------------------------------ providers --------------------
def accumulate(update):
    """Setup of a provider ``update(cov, colsum, x, mask, shift)``: one call on zeroed
    accumulators gives the error; the timed closure keeps accumulating into them."""
    def setup(inp: Inputs) -> Setup:
        d = inp.x.shape[1]
        cov = torch.zeros(d, d, device=inp.x.device)
        colsum = torch.zeros(d, device=inp.x.device)
        update(cov, colsum, inp.x, inp.mask, inp.shift)
        values = {} if inp.spec is None else {"rel_err": rel_err_upper(cov, inp.spec)}
        return Setup({"ms": lambda: update(cov, colsum, inp.x, inp.mask, inp.shift)}, values)
    return setup


def backend_update(name: str):
    import eva_kernels
    return eva_kernels.get_backend(name).cov_update


def tf32_update(cov, colsum, x, mask, shift):
    """The torch backend with TF32 matmuls allowed."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return backend_update("torch")(cov, colsum, x, mask, shift)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def bf16_update(mode: str):
    """bf16 GEMM with fp32 output added into ``cov`` (``mode`` from :func:`addmm_out_dtype_mode`)."""
    def update(cov, colsum, x, mask, shift):
        xb = x.to(torch.bfloat16) if shift is None else (x.float() - shift).to(torch.bfloat16)
        xm = xb if mask is None else torch.where(mask.unsqueeze(1), xb, xb.new_zeros(()))
        if mode == "inplace":
            torch.addmm(cov, xm.mT, xm, out_dtype=torch.float32, out=cov)
        elif mode == "copy":
            cov.copy_(torch.addmm(cov, xm.mT, xm, out_dtype=torch.float32))
        else:
            cov.add_((xm.mT @ xm).float())
        colsum.add_(xm.float().sum(0))
        return mask.sum(dtype=torch.int64) if mask is not None else torch.tensor(x.shape[0])
    return update


def addmm_out_dtype_mode(dev) -> str:
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


def rel_err_upper(cov: torch.Tensor, spec: torch.Tensor) -> float:
    """max |cov - spec| over the upper triangle / max |spec| (spec symmetric, float64)."""
    diff = torch.triu(cov.double() - spec).abs().max()
    return float(diff / spec.abs().max().clamp_min(1e-30))


def choose_providers(mode: str, dev: str, env: dict, names: Optional[str]):
    """``({provider: setup}, main backend)``: the backends that run on ``dev`` (+ the CUDA
    baselines), restricted to the comma list ``names``; the main backend is the one ``auto``
    picks on the benchmarked device type (what ``speedup`` and ``x_vs_*`` are about)."""
    import eva_kernels
    backends = eva_kernels.available_backends(dev)
    if mode == "cuda" and "triton" not in backends:
        try:
            eva_kernels.resolve_backend("cov_update", dev, "triton")
        except eva_kernels.BackendUnavailableError as exc:
            print(f"note: {exc}", flush=True)
    providers = {b: accumulate(backend_update(b)) for b in backends}
    if "triton" in backends:
        providers["triton_fast"] = accumulate(eva_kernels.get_backend("triton").cov_update_fast)
    if mode == "cuda":
        env["bf16_baseline_mode"] = addmm_out_dtype_mode(dev) or "bf16-gemm-then-upcast"
        env["triton_fp32_dot"] = harness.backend_info("triton", "fp32_dot")
        providers.update(tf32=accumulate(tf32_update), bf16=accumulate(bf16_update(env["bf16_baseline_mode"])))
    if names:
        providers = {p: providers[p] for p in names.split(",") if p in providers}
    if not any(b in providers for b in backends):
        raise SystemExit(f"{SCRIPT}: --providers must name at least one of the backends {backends}")
    main_backend = max((b for b in providers if b in backends),
                       key=lambda b: eva_kernels.get_backend(b).priority.get(mode, -1))
    return providers, main_backend


def bf16_peak_tflops(timer, dev: str, m: int) -> float:
    """Measured bf16 dense GEMM rate (m x m x m), the reference of ``useful_%peak``."""
    a, b = (torch.randn(m, m, device=dev, dtype=torch.bfloat16) for _ in range(2))
    ms = timer.ms({"peak": lambda: a @ b})["peak"]
    tflops = 2 * m ** 3 / (ms * 1e-3) / 1e12
    print(f"bf16 GEMM {m}^3: {ms:.3f} ms = {tflops:.1f} TFLOP/s (measured peak)", flush=True)
    return tflops


# ------------------------------------------------------------------ main -------------------------
def main(argv=None):
    args = parse_args(argv)
    mode = args.device
    dev = harness.gpu_device(args, SCRIPT) if (mode == "cuda" or args.dry_run) else "cpu"
    from eva_kernels.testing import cov_update_spec

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    sizes = SIZES["dry-run"]["full"] if args.dry_run else SIZES[mode]["quick" if args.quick else "full"]
    ds, ns = args.d or sizes[0], args.n or sizes[1]
    keep = args.keep if args.keep is not None else (0.9 if mode == "cuda" else 1.0)

    env = harness.environment(dev)
    providers, main_backend = choose_providers(mode, dev, env, args.providers)
    timer = harness.Timer(dev, dry_run=args.dry_run, repeats=args.repeats if mode == "cpu" else 100)
    if mode == "cuda":
        env["bf16_peak_tflops"] = bf16_peak_tflops(timer, dev, 256 if args.dry_run else 8192)

    gen = torch.Generator(device=dev)
    gen.manual_seed(0)

    def make_inputs(case) -> Inputs:
        n, d = case["n"], case["d"]
        x = torch.randn(n, d, device=dev, generator=gen).to(getattr(torch, case["dtype"]))
        mask = torch.rand(n, device=dev, generator=gen) < keep if keep < 1 else None
        shift = x[:64].float().mean(0) if case["shift"] == "mean" else None
        spec = None
        if n <= args.error_max_n:
            spec = torch.zeros(d, d, dtype=torch.float64, device=dev)
            cov_update_spec(spec, torch.zeros(d, dtype=torch.float64, device=dev), x, mask, shift)
        return Inputs(x, mask, shift, spec)

    rate, per_ms, label = RATE[mode]

    def derive(row):
        flops = 2.0 * row["n"] * row["d"] ** 2
        out = {f"{p}_{rate}": flops / row[f"{p}_ms"] / per_ms for p in providers}
        main_ms = row[f"{main_backend}_ms"]
        if "torch_ms" in row:
            out["speedup"] = row["torch_ms"] / main_ms
        out.update({f"x_vs_{b}": row[f"{b}_ms"] / main_ms for b in BASELINES if f"{b}_ms" in row})
        if "triton_fast_ms" in row and "bf16_ms" in row:  # issue 22's goal: fast shifted <= 0.7x the GEMM's time
            out["fast_x_vs_bf16"] = row["bf16_ms"] / row["triton_fast_ms"]
        if mode == "cuda":
            useful = row["n"] * row["d"] * (row["d"] + 1) / (main_ms * 1e-3) / 1e12
            out["useful_%peak"] = 100 * useful / env["bf16_peak_tflops"]
        return out

    def repeats(case):  # cpu: fewer runs of the largest sizes
        return args.repeats if case["d"] < 4096 else max(3, args.repeats // 2)

    print(f"{SCRIPT} --device {mode}: providers {list(providers)} (main backend {main_backend}) on "
          f"{env['device']}; d {ds}, n {ns}, mask keeps {keep:.0%}", flush=True)
    shifts = args.shift.split(",")
    if not set(shifts) <= {"none", "mean"}:
        raise SystemExit(f"{SCRIPT}: --shift takes none and/or mean, got {args.shift!r}")
    rows = harness.run_grid(harness.grid(dtype=DTYPES[mode], shift=shifts, d=ds, n=ns), make_inputs, providers, timer,
                            derive=derive, repeats=repeats if mode == "cpu" else None)

    meta = dict(env, device="cpu" if dev == "cpu" else env["device"], cpu=harness.cpu_name(),
                threads=torch.get_num_threads(), cpu_isa=harness.backend_info("cpp", "cpu_isa"),
                main_backend=main_backend,
                providers=list(providers), keep=keep, dry_run=args.dry_run,
                repeats=args.repeats if mode == "cpu" else None, kc=os.environ.get("EVA_CPP_KC", "256"),
                load_avg_1min=os.getloadavg()[0],
                note=f"{label} counts 2*n*d^2 for every provider; the kernels compute only the upper triangle; "
                     + ("interleaved wall-clock medians (ms)" if mode == "cpu" else "do_bench medians (ms)"))
    out = args.out or harness.default_out(f"cov_update_{'gpu' if mode == 'cuda' else 'cpu'}", dev,
                                          partial=args.quick or args.dry_run)
    columns = (["dtype", "shift", "n", "d"] + [f"{p}_ms" for p in providers] + [f"{p}_{rate}" for p in providers]
               + ["speedup", "useful_%peak"] + [f"x_vs_{b}" for b in BASELINES] + ["fast_x_vs_bf16"]
               + [f"{p}_rel_err" for p in providers])
    if mode == "cpu":
        title = (f"cov_update on {meta['cpu']} ({meta['threads']} threads, cpp ISA {meta['cpu_isa']}, torch "
                 f"{meta['torch']}); interleaved medians of {args.repeats} runs (d>=4096: "
                 f"{max(3, args.repeats // 2)}); load avg {meta['load_avg_1min']:.2f}; "
                 f"speedup = torch / {main_backend}")
    else:
        title = (f"cov_update on {env['device']} (bf16 peak {env['bf16_peak_tflops']:.0f} TFLOP/s, mask keeps "
                 f"{keep:.0%}); times in ms; speedup, x_vs_* and useful_%peak of {main_backend}")
    harness.report(out, {"meta": meta, "rows": rows}, rows, columns, title, markdown=mode == "cpu")


if __name__ == "__main__":
    main()
