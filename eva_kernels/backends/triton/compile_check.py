"""Compile every Triton kernel variant and config for sm_80 and sm_90, without a GPU.

    python -m eva_kernels.backends.triton.compile_check [--jobs N] [--sm 80,90]

For each :class:`~.launches.Launch`: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", sm,
32))`` for every (variant, config); then ``ptxas -v`` (Triton's own) on the PTX for registers and
spills, and Triton's metadata for the shared memory. One line per case is printed. The check
fails (exit code 1) when

* a ``@triton.jit`` function of the backend has no ``Launch`` (a new kernel must say how it is
  launched, or why it never is);
* a variant of :data:`~.launches.WIDE_TILES_REQUIRED` keeps no spill-free 128-wide 8-warp
  config on its target (Hopper's full-width ``wgmma``);
* a case does not compile, lacks the tensor-core instructions its variant is meant to use
  (``Variant.mma``), spills registers, or needs more shared memory than the target has
  (sm_80: 163 KiB, sm_90: 227 KiB per block), unless it is listed with its reason in the
  running Triton's exclusion table (``launches.exclusions()``: ``EXCLUDED`` for CI's Triton,
  ``EXCLUDED_BY_TRITON`` for others, measured by ``make test-torch-matrix``; the autotuners
  prune those at run time).

Must run without ``TRITON_INTERPRET=1`` (the kernels must be compiled, not interpreted); ``make
test`` runs it that way before the test suite. Compiled kernels are cached by Triton
(``~/.triton/cache``), so a second run takes seconds.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, NamedTuple, Optional, Tuple

#: Shared memory one block may use (the opt-in maximum), bytes.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_BACKEND_MODULES = ("chunk_sums", "config", "cov_update_kernel", "eigen_steps", "upper_bmm")


class Report(NamedTuple):
    kernel: str
    variant: str
    config: str
    sm: int
    regs: Optional[int]
    spill_bytes: Optional[int]
    smem: Optional[int]
    seconds: float
    error: Optional[str]
    missing_mma: Optional[str] = None  # expected tensor-core operand type absent from the PTX
    mma_shapes: str = ""  # the tensor-core instruction shapes in the PTX (e.g. "wgmma m64n64k8")

    def problem(self) -> Optional[str]:
        """Why this case fails the check (None when it passes)."""
        if self.error:
            return f"does not compile: {self.error}"
        if self.missing_mma:
            return f"no {self.missing_mma} tensor-core instruction (mma.sync / wgmma) in the PTX"
        if self.spill_bytes:
            return f"spills {self.spill_bytes} B"
        if self.smem is not None and self.smem > SMEM_LIMIT[self.sm]:
            return f"needs {self.smem // 1024} KiB shared memory > {SMEM_LIMIT[self.sm] // 1024} KiB"
        return None


def _ptxas(sm: int) -> str:
    """Path of the ptxas Triton uses for ``sm`` (falls back to one on PATH)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            return get_ptxas(sm).path
        except TypeError:  # older Triton: get_ptxas() without an architecture
            return get_ptxas().path
    except Exception:  # noqa: BLE001 - layout of Triton's internals changed
        import shutil
        return shutil.which("ptxas") or "ptxas"


def _resources(ptx: str, sm: int) -> Tuple[int, int]:
    """(registers, spill store + load bytes) of the single kernel in ``ptx``, by ``ptxas -v``."""
    arch = "sm_90a" if sm == 90 else f"sm_{sm}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([_ptxas(sm), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spills


def _mma_shapes(ptx: str) -> str:
    """The tensor-core instruction shapes of ``ptx``: ``wgmma m64nNkK`` (sm_90's warpgroup MMAs,
    whose ``N`` is the tile width a warpgroup feeds) or ``mma mMnNkK`` (sm_80's); "-" for none."""
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async[.\w]*?\.(m\d+n\d+k\d+)", ptx)), key=len)
    if wgmma:
        return "wgmma " + ",".join(wgmma)
    mma = sorted(set(re.findall(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    return "mma " + ",".join(mma) if mma else "-"


def _has_mma(ptx: str, operand: str) -> bool:
    """Whether ``ptx`` multiplies ``operand``-typed tiles on tensor cores (mma.sync or wgmma)."""
    return re.search(rf"\b(?:mma\.sync|wgmma\.mma_async)[.\w]*\.{operand}\.{operand}\b", ptx) is not None


def _compile_case(args) -> Report:
    """Worker: compile one (launch, variant, config, sm) case and measure it."""
    li, vi, ci, sm = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .launches import LAUNCHES, config_label

    launch = LAUNCHES[li]
    variant, cfg = launch.variants[vi], launch.configs[ci]
    signature = {**launch.signature, **variant.types}
    constexprs = {**variant.constexprs, **cfg.kwargs}
    names = list(launch.kernel.arg_names)
    full_sig = {n: signature.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n in variant.divisible}
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(launch.kernel, full_sig, constexprs, attrs),
                                  target=GPUTarget("cuda", sm, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        ptx = compiled.asm["ptx"]
        regs, spills = _resources(ptx, sm)
        smem, error = int(compiled.metadata.shared), None
        missing = variant.mma if variant.mma and not _has_mma(ptx, variant.mma) else None
        shapes = _mma_shapes(ptx)
    except Exception as exc:  # noqa: BLE001 - reported as this case's failure
        regs = spills = smem = missing = None
        shapes = ""
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return Report(launch.name, variant.label, config_label(cfg), sm, regs, spills, smem,
                  time.perf_counter() - t0, error, missing, shapes)


def _jit_functions() -> Dict[str, object]:
    """Every ``@triton.jit`` function of the backend's modules, by name (autotuners unwrapped)."""
    import importlib

    from triton.runtime.jit import JITFunction
    found = {}
    for mod_name in _BACKEND_MODULES:
        mod = importlib.import_module(f"{__package__}.{mod_name}")
        for value in vars(mod).values():
            fn = value if isinstance(value, JITFunction) else getattr(value, "fn", None)
            if isinstance(fn, JITFunction) and fn.__module__ == mod.__name__:
                found[fn.__name__] = fn
    return found


def _check_wide_tiles(cases, reports) -> int:
    """Failures of :data:`.launches.WIDE_TILES_REQUIRED`: a listed variant compiled for its sm
    without one passing, non-excluded 128-wide 8-warp config."""
    from .launches import LAUNCHES, WIDE_TILES_REQUIRED, excluded_reason, is_wide
    good = set()
    compiled = set()
    for (li, vi, ci, sm), r in zip(cases, reports):
        cfg = LAUNCHES[li].configs[ci]
        compiled.add((r.kernel, r.variant, sm))
        if is_wide(cfg) and r.problem() is None and excluded_reason(r.kernel, cfg, r.variant, sm) is None:
            good.add((r.kernel, r.variant, sm))
    failures = 0
    for (kernel, sm), variants in WIDE_TILES_REQUIRED.items():
        for variant in variants:
            if (kernel, variant, sm) in compiled and (kernel, variant, sm) not in good:
                print(f"FAIL {kernel} {variant} sm_{sm}: no spill-free 128-wide 8-warp config (WIDE_TILES_REQUIRED)")
                failures += 1
            elif (kernel, variant, sm) in good:
                print(f"wide tiles: {kernel} {variant} sm_{sm} keeps a 128-wide 8-warp config")
    return failures


def run(sms: List[int], jobs: int) -> int:
    """Compile everything, print the report, return the number of failures."""
    from .config import INTERPRET, MIN_TRITON, TRITON_VERSION
    if INTERPRET:
        print("compile check: TRITON_INTERPRET=1 is set; run it without (the kernels must be compiled)")
        return 1
    if TRITON_VERSION < MIN_TRITON:  # the backend refuses to run there (config.why_not): nothing to check
        print(f"compile check: skipped, Triton {'.'.join(map(str, TRITON_VERSION))} is older than "
              f"{'.'.join(map(str, MIN_TRITON))}, the oldest the kernels support")
        return 0
    from .launches import LAUNCHES, excluded_reason

    failures = 0
    described = {launch.name for launch in LAUNCHES}
    for name in sorted(set(_jit_functions()) - described):
        print(f"FAIL {name}: a @triton.jit kernel without a Launch in launches.py (say how it is launched)")
        failures += 1
    cases = [(li, vi, ci, sm) for li, launch in enumerate(LAUNCHES) if not launch.never_launched
             for vi in range(len(launch.variants)) for ci in range(len(launch.configs)) for sm in sms]
    for launch in LAUNCHES:
        if launch.never_launched:
            print(f"skip {launch.name}: never launched ({launch.never_launched})")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        reports = list(pool.map(_compile_case, cases))
    print(f"{'kernel':<24} {'sm':>3} {'variant':<24} {'config':<42} {'regs':>4} {'spill':>6} {'smem KiB':>8}  "
          f"{'tensor cores':<22} status")
    for (li, vi, ci, sm), r in zip(cases, reports):
        launch = LAUNCHES[li]
        problem = r.problem()
        reason = excluded_reason(r.kernel, launch.configs[ci], r.variant, sm)
        if problem and reason:
            status = f"excluded ({problem}): {reason}"
        elif problem:
            status = f"FAIL: {problem}"
            failures += 1
        elif reason:
            status = f"ok, but listed as excluded ({reason}): remove it from this Triton's table (launches.exclusions)"
            failures += 1
        else:
            status = "ok"
        smem = "-" if r.smem is None else f"{r.smem / 1024:.0f}"
        print(f"{r.kernel:<24} {sm:>3} {r.variant:<24} {r.config:<42} {r.regs if r.regs is not None else '-':>4} "
              f"{r.spill_bytes if r.spill_bytes is not None else '-':>6} {smem:>8}  {r.mma_shapes or '-':<22} {status}")
    failures += _check_wide_tiles(cases, reports)
    print(f"compile check: {len(cases)} cases for sm_{', sm_'.join(map(str, sms))} in "
          f"{time.perf_counter() - t0:.0f} s, {failures} failure(s)")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eva_kernels.backends.triton.compile_check",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--sm", default="80,90", help="compute capabilities to compile for (default 80,90)")
    args = parser.parse_args(argv)
    return 1 if run([int(s) for s in args.sm.split(",")], max(1, args.jobs)) else 0


if __name__ == "__main__":
    sys.exit(main())
