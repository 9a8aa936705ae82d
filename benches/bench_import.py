"""Import times of ``eva_kernels`` and ``eva`` in fresh interpreters (issue 23).

Each import (``eva``: its first public name, as it imports lazily) runs ``--repeats`` times in a new ``python -c``, timed inside it with
``time.perf_counter`` (the interpreter's own start-up excluded); medians are printed, with the
heavy libraries each import pulled in. Nothing is written.

    python -m benches.bench_import [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

HEAVY = ("torch", "triton", "transformers", "peft", "accelerate", "matplotlib", "safetensors", "tqdm")
CODE = ("import json, sys, time; t = time.perf_counter(); {stmt}; dt = time.perf_counter() - t; "
        "print(json.dumps([dt, [m for m in {heavy!r} if m in sys.modules]]))")
#: what is timed: ``eva`` imports lazily, so its cost is that of its first public name
STATEMENTS = {"torch": "import torch", "eva_kernels": "import eva_kernels",
              "eva": "from eva import get_eva_state_dict"}


def measure(stmt: str, repeats: int):
    times, loaded = [], []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CODE.format(stmt=stmt, heavy=HEAVY)], capture_output=True,
                             text=True, check=True)
        dt, loaded = json.loads(out.stdout.strip().splitlines()[-1])
        times.append(dt)
    return statistics.median(times), loaded


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benches.bench_import", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    for name, stmt in STATEMENTS.items():
        seconds, loaded = measure(stmt, args.repeats)
        print(f"{stmt:<38} {seconds:6.2f} s (median of {args.repeats}); loads: {', '.join(loaded) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
