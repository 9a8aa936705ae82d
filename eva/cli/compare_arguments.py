"""The options of ``eva compare``; ``--help`` states the default of every one.

The split sizes default to ``None`` ("not passed"), so that :func:`eva.compare.splits.fit_sizes`
can scale the defaults down to a small CSV and leave passed sizes alone; their help states the
numbers (:data:`SPLIT_DEFAULTS`, the same as ``eva.compare.splits``, which imports torch through
its package and so is not imported here: a test checks they agree).
"""
from __future__ import annotations

import argparse
import textwrap

from ..config import DEFAULT_RANK
from .arguments import DEMO_TARGETS, _finite_float, _HelpFormatter, _int_at_least, _target_modules

#: ``--train-size``, ``--validation-size``, ``--test-size``, ``--calibration-size`` when not passed
SPLIT_DEFAULTS = {"train": 1200, "validation": 200, "test": 400, "calibration": 64}

_DESCRIPTION = textwrap.fill(
    "Fine-tune a sequence classifier (the model plus a classification head; the encoder through LoRA) from "
    "each initialisation, with several seeds, on the rows of a CSV, and write training-loss curves and test "
    "accuracies (PNG and JSON). Classification only for now: one text column, one label column (integers or "
    "class names). One learning rate for all methods: the best validation accuracy of the default LoRA init "
    "over 3e-4, 1e-3 and 3e-3 (runs of half the steps), unless --lr is given. EVA calibrates on training rows "
    "only.", width=90)

_EPILOG = """\
split sizes: those not passed are the defaults, scaled down by one factor when the CSV has
  fewer rows (one line prints the sizes used); passed sizes that do not fit are refused with
  sizes that do.
reading the results: the table gives each method's mean test accuracy; with 2 or more seeds
  also the range over seeds (min..max) and, against the first method of --methods, "within
  noise" (the ranges overlap) or "above noise" / "below noise" (they do not). One seed shows
  no spread and no verdict. The PNG's accuracy axis starts at 0, with the accuracy of always
  answering the test split's majority class as a dashed line.
"""


def _lr(text: str) -> float:
    """argparse ``type=`` of ``--lr``: a finite number in (0, 1]."""
    return _finite_float_in(text, "--lr must be a positive number (the AdamW learning rate)", 0.0, 1.0)


def _finite_float_in(text: str, rule: str, low: float, high: float) -> float:
    """``text`` as a finite float in ``(low, high]``; ``ArgumentTypeError`` stating ``rule`` otherwise."""
    value = _finite_float(text, rule)
    if not low < value <= high:
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
    return value


def _add_data_options(cmp: argparse.ArgumentParser) -> None:
    """The model, the CSV, its columns and the split sizes."""
    cmp.add_argument("--model", default=None, metavar="FOLDER",
                     help="transformers model folder (default: the bundled MiniLM)")
    cmp.add_argument("--data", required=True, metavar="CSV", help="CSV file with a header row (required)")
    cmp.add_argument("--text-column", default="text", metavar="NAME",
                     help="column holding the texts (default: %(default)s)")
    cmp.add_argument("--label-column", default="label", metavar="NAME",
                     help="column holding the labels, integers or class names (default: %(default)s)")
    sizes = (("--train-size", "train", 2, "training rows"),
             ("--validation-size", "validation", 1, "validation rows, for the learning-rate search"),
             ("--test-size", "test", 1, "test rows, for the accuracy"))
    for flag, key, low, what in sizes:
        cmp.add_argument(flag, type=_int_at_least(low, what), default=None, metavar="N",
                         help=f"{what} (default: {SPLIT_DEFAULTS[key]}, scaled down to a smaller CSV)")
    cmp.add_argument("--calibration-size", type=_int_at_least(2, "EVA calibration rows"), default=None,
                     metavar="N", help=f"training rows EVA calibrates on, at most --train-size (default: "
                                       f"{SPLIT_DEFAULTS['calibration']}, or the training rows if fewer)")


def _add_training_options(cmp: argparse.ArgumentParser) -> None:
    """The methods and the fine-tuning settings."""
    cmp.add_argument("--methods", default="lora,eva,pissa",
                     help="comma list of lora (PEFT's default init), eva, eva-whiten, pissa, olora; the first is "
                          "the baseline of the noise verdicts (default: %(default)s)")
    cmp.add_argument("--steps", type=_int_at_least(1, "optimiser steps"), default=90,
                     help="optimiser steps per run (default: %(default)s)")
    cmp.add_argument("--seeds", type=_int_at_least(1, "seeds per method"), default=3,
                     help="runs per method; 2 or more give the spread and the noise verdicts (default: %(default)s)")
    cmp.add_argument("--rank", type=_int_at_least(1, "the LoRA rank r"), default=DEFAULT_RANK,
                     help="LoRA rank r, alpha = r (default: %(default)s)")
    cmp.add_argument("--lr", type=_lr, default=None,
                     help="learning rate of every method (default: chosen on validation rows)")
    cmp.add_argument("--lr-per-method", action="store_true",
                     help="run the learning-rate search for every method on its own init, instead of one rate "
                          "(the default init's) for all; 1.5 runs more per method (default: off)")
    cmp.add_argument("--batch-size", type=_int_at_least(1, "rows per batch"), default=8,
                     help="rows per optimiser step (default: %(default)s)")
    cmp.add_argument("--max-length", type=_int_at_least(2, "tokens per row"), default=64,
                     help="tokens per row, longer rows are cut (default: %(default)s)")
    cmp.add_argument("--target-modules", type=_target_modules, default=DEMO_TARGETS, metavar="NAMES",
                     help="comma-separated module names LoRA wraps, or all-linear (default: %(default)s)")


def add_compare(sub) -> None:
    """``eva compare``: LoRA initialisations fine-tuned on the user's labelled CSV."""
    cmp = sub.add_parser(
        "compare", formatter_class=_HelpFormatter, description=_DESCRIPTION, epilog=_EPILOG,
        help="fine-tune with EVA and other LoRA initialisations on your labelled CSV (classification)")
    _add_data_options(cmp)
    _add_training_options(cmp)
    cmp.add_argument("--out-json", default="eva_compare.json", metavar="FILE",
                     help="every number, written atomically (default: %(default)s)")
    cmp.add_argument("--out-png", default="eva_compare.png", metavar="FILE",
                     help="loss curves and test accuracies (default: %(default)s)")
