"""Command line: ``eva init``, ``eva demo``, ``eva inspect``.

    eva init --model FOLDER|FILE.gguf --data TEXTFILE [--task auto --rank 8 --rho 2 --tau 0.99
             --batch-size 8 --max-length 128 --target-modules all-linear --out FILE --plot FILE]
    eva demo      # bundled MiniLM + bundled calibration text
    eva compare --data train.csv [--methods lora,eva,pissa --steps 90 --seeds 3]
    eva inspect FILE.safetensors

``init`` and ``demo`` check every input first (numbers, output paths, data file, model folder
and config, device, LoRA/EVA settings, target modules) and only then load the tokenizer and the
model weights, so a mistake costs no computation. Every user mistake ends the command with one
line ``eva: error: ...`` (``eva init: error: ...`` for the argument syntax) on stderr and exit
code 2; an existing ``--out`` file is never damaged.
"""
from __future__ import annotations

import os
import sys

from ..errors import EvaError
from .arguments import DEMO_TARGETS, build_parser, one_line
from .run import run_command, inspect_file

__all__ = ["main", "build_parser", "DEMO_TARGETS"]


def _dispatch(args) -> int:
    """Run the chosen command."""
    if args.cmd == "inspect":
        return inspect_file(args.file)
    if args.cmd == "compare":
        from .compare_command import compare_command
        return compare_command(args)
    if args.cmd == "demo":
        from .text_data import bundled_calibration_path, bundled_model_path
        return run_command(args, args.model or bundled_model_path(), args.data or bundled_calibration_path())
    return run_command(args, args.model, args.data)


def main(argv=None) -> int:
    """The ``eva`` command line; returns the exit code (argument syntax errors exit with 2).

    User mistakes (:class:`EvaError`, file system ``OSError``) print one line
    ``eva: error: <message>`` on stderr and return 2; Ctrl-C returns 130. Anything else is a bug
    and propagates with its traceback.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.argv = argv  # recorded in the result's provenance
        return _dispatch(args)
    except (EvaError, OSError) as exc:
        print(f"eva: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eva: interrupted (outputs are written atomically: each is complete or untouched)", file=sys.stderr)
        return 130
