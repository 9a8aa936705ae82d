"""The one shared utility of the benchmark scripts: timing, grids of providers, JSON, tables.

A bench script only says *what* to measure (in the manner of Liger-Kernel's benchmarks): a grid
of cases, a function that builds one case's inputs, and per provider (a backend, or a baseline)
a setup function that returns a :class:`Setup`: the closures to time and the values measured
once (errors, overlaps). :func:`run_grid` times every provider of every case with one
:class:`Timer`, and :func:`report` writes the JSON record and prints the table.

Timing (:class:`Timer`):

* CPU: ``time.perf_counter`` wall clock; every closure is called once (warm-up), then the
  closures of a case run interleaved ``repeats`` times and the median is kept, so that load
  from other processes on shared cores hits them alike.
* CUDA: ``triton.testing.do_bench`` medians when Triton is importable, else CUDA events
  (``warmup`` calls, then the median of ``repeats`` timed calls).
* ``--dry-run`` (Triton's CPU interpreter, tiny sizes): one wall-clock call after one warm-up;
  a smoke test, not a measurement.

Generic on purpose: nothing here knows about a particular op. Torch and Triton are imported
lazily, so that :func:`setup_dry_run` can still set ``TRITON_INTERPRET`` before them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Union

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: where partial runs (--quick, --dry-run) write by default: never over the committed results.
SCRATCH_DIR = os.path.join(tempfile.gettempdir(), "eva-benches")


# ------------------------------------------------------------------ environment ------------------
def slug(text: str) -> str:
    """Filesystem-friendly lower-case name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]
    return s or "unknown"


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str = "cuda") -> str:
    """The GPU's name for a CUDA device (when one is usable), else the CPU's."""
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


def environment(device: str = "cuda") -> Dict[str, Any]:
    """Device name, date and library versions for the JSON record."""
    import torch
    env: Dict[str, Any] = {
        "device": device_name(device),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        env["triton"] = f"unavailable ({type(exc).__name__})"
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        env["sm_count"] = p.multi_processor_count
        env["capability"] = f"{p.major}.{p.minor}"
        env["memory_gib"] = round(p.total_memory / 2**30, 1)
    import eva_kernels
    env["eva_kernels"] = eva_kernels.__version__
    return env


def backend_info(name: str, key: str) -> Optional[str]:
    """``eva_kernels.get_backend(name).info[key]``, or None when that backend is not registered."""
    import eva_kernels
    try:
        return eva_kernels.get_backend(name).info.get(key)
    except eva_kernels.BackendUnavailableError:
        return None


# ------------------------------------------------------------------ command line -----------------
def parser(doc: str, prog: str, *, dry_run: bool = True, quick: str = "fewer sizes") -> argparse.ArgumentParser:
    """Argument parser with the options every bench has: --quick, --out and (GPU) --dry-run.
    ``--help`` shows the script's docstring (``doc``): its first paragraph, then the rest."""
    head, _, rest = doc.partition("\n\n")
    p = argparse.ArgumentParser(prog=prog, description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick)
    if dry_run:
        p.add_argument("--dry-run", action="store_true",
                       help="tiny sizes on CPU under TRITON_INTERPRET=1 (a smoke test, not a measurement)")
    p.add_argument("--out", default=None,
                   help=f"JSON path (default {os.path.relpath(RESULTS_DIR)}/<bench>_<device>.json; "
                        f"--quick and --dry-run runs write under {SCRATCH_DIR})")
    return p


def int_list(text: str) -> List[int]:
    """argparse type of a comma list of ints: '384,1024' -> [384, 1024]."""
    return [int(v) for v in text.split(",") if v.strip()]


def setup_dry_run() -> None:
    """Call before importing triton/eva_kernels: run the Triton kernels in the CPU interpreter."""
    os.environ["TRITON_INTERPRET"] = "1"


def package_file(module: str, relpath: str, pip_names: str, script: str, make_target: str) -> str:
    """The path of ``relpath`` inside the installed package ``module``; exits with the install
    command when the package is missing (data and models that ship on PyPI)."""
    import importlib
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(f"{script}: needs the PyPI package(s) {pip_names} (pip install {pip_names}, or "
                         f"make {make_target})") from exc
    return os.path.join(os.path.dirname(mod.__file__), relpath)


def require_cuda(script: str) -> None:
    """Exit with a clear message (no traceback) on a machine without a usable CUDA device."""
    import torch
    if not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA device (torch {torch.__version__}, cuda={torch.version.cuda}); "
                 "this is a GPU benchmark. Use --dry-run to smoke-test it on CPU with the Triton interpreter.")


def gpu_device(args, script: str) -> str:
    """The device of a GPU bench: "cuda" (exits when there is none) or, with --dry-run, "cpu"
    with Triton's interpreter switched on. Call before eva_kernels is imported."""
    if args.dry_run:
        setup_dry_run()
        return "cpu"
    require_cuda(script)
    return "cuda"


def default_out(bench: str, device: str = "cuda", partial: bool = False) -> str:
    """``benches/results/<bench>_<device slug>.json``; partial runs go to :data:`SCRATCH_DIR`."""
    return os.path.join(SCRATCH_DIR if partial else RESULTS_DIR, f"{bench}_{slug(device_name(device))}.json")


# ------------------------------------------------------------------ timing -----------------------
class Timer:
    """Times closures on ``device`` ("cpu" or "cuda"); ``dry_run``: one call, no statistics.

    :meth:`run` is one synchronised call (end-to-end timings); :meth:`ms` the median
    milliseconds of several closures (kernel timings, see the module docstring). ``repeats``:
    timed calls per closure on CPU (and with CUDA events); with ``do_bench``, its ``rep`` (ms).
    ``warmup``: CUDA only (``do_bench``'s ``warmup`` in ms, or warm-up calls with events).
    """

    def __init__(self, device: str, dry_run: bool = False, warmup: int = 25, repeats: int = 100):
        self.cuda = device.startswith("cuda")
        self.dry_run, self.warmup, self.repeats = dry_run, warmup, repeats

    def sync(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()

    def run(self, fn: Callable[[], Any]):
        """``(fn(), wall seconds, device seconds)``: CUDA events on GPU, the wall clock on CPU."""
        import torch
        self.sync()
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            end.record()
        self.sync()
        wall = time.perf_counter() - t0
        return out, wall, (start.elapsed_time(end) / 1e3 if self.cuda else wall)

    def median_s(self, fn: Callable[[], Any], repeats: int) -> float:
        """Median device seconds of ``max(1, repeats)`` calls of ``fn`` (no warm-up)."""
        return statistics.median(self.run(fn)[2] for _ in range(max(1, repeats)))

    def ms(self, fns: Dict[str, Callable[[], Any]], repeats: Optional[int] = None) -> Dict[str, float]:
        """Median milliseconds of each closure, after one warm-up call of each."""
        for f in fns.values():
            f()  # compile / autotune / first-touch outside the timing
        if self.dry_run:
            return {k: 1e3 * self.run(f)[1] for k, f in fns.items()}
        if self.cuda:
            return {k: self._cuda_ms(f, repeats) for k, f in fns.items()}
        times: Dict[str, List[float]] = {k: [] for k in fns}
        for _ in range(max(1, repeats or self.repeats)):  # interleaved: shared-core noise hits all alike
            for k, f in fns.items():
                times[k].append(1e3 * self.run(f)[1])
        return {k: statistics.median(t) for k, t in times.items()}

    def _cuda_ms(self, fn: Callable[[], Any], repeats: Optional[int]) -> float:
        try:
            import triton.testing
        except Exception:  # noqa: BLE001 - no Triton: CUDA events
            for _ in range(self.warmup):
                fn()
            return 1e3 * self.median_s(fn, repeats or self.repeats)
        return float(triton.testing.do_bench(fn, warmup=self.warmup, rep=repeats or self.repeats,
                                             return_mode="median"))

    def free(self) -> None:
        """Give cached device memory back between cases."""
        if self.cuda:
            import torch
            torch.cuda.empty_cache()


# ------------------------------------------------------------------ providers and grids ----------
class Setup(NamedTuple):
    """What one provider contributes to one case: closures to time (metric -> fn, reported in
    ms) and values measured once (metric -> number, e.g. an error or an overlap)."""
    timed: Dict[str, Callable[[], Any]]
    values: Dict[str, Any] = {}


def grid(**axes: Iterable) -> List[Dict[str, Any]]:
    """Cartesian product of named axes, first axis outermost: grid(n=[1, 2], d=[3]) -> dicts."""
    names = list(axes)
    return [dict(zip(names, combo)) for combo in itertools.product(*axes.values())]


def run_grid(cases: Iterable[Dict[str, Any]], make_inputs: Callable[[Dict[str, Any]], Any],
             providers: Dict[str, Callable[[Any], Setup]], timer: Timer, *,
             key: str = "{provider}_{metric}",
             derive: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
             repeats: Union[int, Callable[[Dict[str, Any]], Optional[int]], None] = None) -> List[Dict[str, Any]]:
    """One row per case: the case's parameters, every provider's timed metrics (ms) and values
    under ``key.format(provider=..., metric=...)``, then ``derive(row)`` (rates, speed-ups).

    ``make_inputs(case)`` builds the inputs all providers of the case share; each provider's
    setup turns them into a :class:`Setup`. ``repeats`` (or ``repeats(case)``) overrides the
    timer's repeat count per case. Rows are printed as they complete.
    """
    rows = []
    for case in cases:
        inputs = make_inputs(case)
        timed: Dict[str, Callable[[], Any]] = {}
        values: Dict[str, Any] = {}
        for provider, setup in providers.items():
            s = setup(inputs)
            timed.update({key.format(provider=provider, metric=m): f for m, f in s.timed.items()})
            values.update({key.format(provider=provider, metric=m): v for m, v in s.values.items()})
        row = dict(case)
        row.update(timer.ms(timed, repeats(case) if callable(repeats) else repeats))
        row.update(values)
        if derive is not None:
            row.update(derive(row))
        rows.append(row)
        print("  " + " ".join(f"{k}={fmt(v)}" for k, v in row.items()), flush=True)
        del inputs, timed
        timer.free()
    return rows


# ------------------------------------------------------------------ output -----------------------
def write_json(path: str, payload: Dict[str, Any]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=_jsonable)
        f.write("\n")
    return path


def _jsonable(o):
    try:
        return float(o)
    except Exception:  # noqa: BLE001
        return str(o)


def fmt(v: Any) -> str:
    """A table cell: '-' for None, 3 significant digits for floats, str() for the rest."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e4 or a < 1e-2:
            return f"{v:.2e}"
        return f"{v:.3g}" if a < 100 else f"{v:.1f}"
    return str(v)


def format_table(rows: Sequence[Dict[str, Any]], columns: Optional[List[str]] = None,
                 markdown: bool = False) -> str:
    """Plain-text (or Markdown) table of ``rows`` (dicts); ``columns`` picks and orders the keys
    (absent ones are left out)."""
    if not rows:
        return "(no rows)"
    present = [k for r in rows for k in r]
    columns = [c for c in (columns or dict.fromkeys(present)) if c in present]
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    sep, edge = (" | ", "| ") if markdown else ("  ", "")

    def line(values):
        text = sep.join(v.rjust(w) for v, w in zip(values, widths))
        return f"{edge}{text}{edge[::-1]}".rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(row) for row in cells])


def print_table(rows: Sequence[Dict[str, Any]], columns: Optional[List[str]] = None, title: str = "",
                markdown: bool = False) -> None:
    if title:
        print(f"\n{title}")
    print(format_table(rows, columns, markdown), flush=True)


def report(out: str, payload: Dict[str, Any], rows: Sequence[Dict[str, Any]], columns: List[str],
           title: str, markdown: bool = False) -> None:
    """Write ``payload`` to ``out`` as JSON, say where, and print ``rows`` as a table."""
    print(f"\nwrote {write_json(out, payload)}")
    print_table(rows, columns, title=title, markdown=markdown)
