"""Shared helpers for the benchmark scripts: environment record, JSON output, tables.

Generic on purpose (used by every bench): nothing here knows about a particular op.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def slug(text: str) -> str:
    """Filesystem-friendly lower-case name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "unknown"


def device_name(device: str = "cuda") -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


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


def environment(device: str = "cuda") -> Dict[str, Any]:
    """Device name and library versions for the JSON record."""
    import torch
    env: Dict[str, Any] = {
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
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
    return env


def default_out(bench: str, device: str = "cuda") -> str:
    return os.path.join(RESULTS_DIR, f"{bench}_{slug(device_name(device))}.json")


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


def _fmt(v: Any) -> str:
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


def format_table(rows: Sequence[Dict[str, Any]], columns: Optional[List[str]] = None) -> str:
    """Plain-text table of ``rows`` (dicts); ``columns`` picks and orders the keys."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def print_table(rows: Sequence[Dict[str, Any]], columns: Optional[List[str]] = None, title: str = "") -> None:
    if title:
        print(f"\n{title}")
    print(format_table(rows, columns), flush=True)


def require_cuda(script: str) -> None:
    """Exit with a clear message (no traceback) on a machine without a usable CUDA device."""
    import torch
    if not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA device (torch {torch.__version__}, cuda={torch.version.cuda}); "
                 "this is a GPU benchmark. Use --dry-run to smoke-test it on CPU with the Triton interpreter.")


def setup_dry_run() -> None:
    """Call before importing triton/eva_kernels: run kernels in Triton's CPU interpreter."""
    os.environ["TRITON_INTERPRET"] = "1"


def bench_ms(fn, dry_run: bool, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on GPU, one wall-clock call on a dry run."""
    if dry_run:
        import time
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def iter_grid(*axes: Iterable) -> Iterable[tuple]:
    import itertools
    return itertools.product(*axes)
