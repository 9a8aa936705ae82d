"""The ``eva`` argument parser: commands, options, and argparse types that validate numbers.

A bad number or name is reported by argparse itself, as one line
``eva <command>: error: argument --X: ...`` with exit code 2.
"""
from __future__ import annotations

import argparse
import math
from typing import Any, List, Union

from ..config import DEFAULT_RANK, EVA_DEFAULTS, EvaOptions
from ..errors import EvaError
from .tasks import TASKS

#: Default ``--target-modules`` of ``eva demo``: every linear layer of MiniLM's encoder (query,
#: key, value, attention.output.dense, intermediate.dense, output.dense) but not ``pooler.dense``,
#: which sentence embeddings never use and which sees one row per sequence (it never converges).
DEMO_TARGETS = "query,key,value,intermediate.dense,output.dense"

_CHECKS = """\
checked in this order before the model is loaded (a failure prints one line
"eva: error: ..." and exits with code 2; nothing is written):
  1. the numbers (while parsing): --rank >= 1, --batch-size >= 1, --max-length >= 2,
     --max-steps >= 1, --rho finite >= 1.0, --tau finite in [0, 1], --backend a known name,
     --target-modules names at least one module
  2. --out can be created (not a directory, writable location; the file is not touched yet)
  3. --plot has an image format matplotlib writes (.png, .pdf, .svg, ...) and can be created;
     --out, --plot and --data are different files
  4. --data exists, is UTF-8 text (else: the offset of the first bad byte) with a non-empty line
  5. --model is a folder holding config.json (readable by transformers) and a weights file,
     or a .gguf file (needs the gguf package; transformers dequantises it to fp32)
  6. --max-length fits the model's positions (max_position_embeddings / n_positions)
  7. --task has a transformers class for the model (auto: from config.architectures)
  8. --device exists on this machine (cuda, mps, xpu are probed; default cuda if available)
  9. the LoRA/EVA settings and the EVA_BACKEND environment variable
 10. every --target-modules name matches a layer of the model, with the closest names when
     one does not (built from config.json, no weights)
then the tokenizer and the weights are loaded. Outputs are written atomically: a failed run
leaves an existing --out / --plot file unchanged.
"""


def one_line(text: Any) -> str:
    """``str(text)`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line on stderr (no usage block), exit code 2."""

    def error(self, message: str):
        """Print ``"<prog>: error: <message> (see `<prog> --help`)"`` and exit with code 2."""
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks (the numbered list of checks), and never breaks an option's
    help at a hyphen (``all-linear``, ``--task``)."""

    def _split_lines(self, text, width):
        import textwrap
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _int_at_least(low: int, meaning: str):
    """An argparse ``type=``: a whole number >= ``low``; ``meaning`` says what the number is."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low} ({meaning}), got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low} ({meaning}), got {value}")
        return value
    return parse


def _finite_float(text: str, rule: str) -> float:
    """``text`` as a finite float; ``ArgumentTypeError`` stating ``rule`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
    return value


def _rho(text: str) -> float:
    """argparse ``type=`` of ``--rho``: PEFT's rule ``rho >= 1.0``, and finite."""
    rule = f"`rho` must be >= 1.0 and finite (the maximum rank of a layer is r * rho; default {EVA_DEFAULTS['rho']:g})"
    value = _finite_float(text, rule)
    if value < 1.0:
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
    return value


def _tau(text: str) -> float:
    """argparse ``type=`` of ``--tau``: PEFT's rule ``0.0 <= tau <= 1.0``, and finite."""
    rule = f"`tau` must be between 0.0 and 1.0 (the cosine threshold for convergence; default {EVA_DEFAULTS['tau']:g})"
    value = _finite_float(text, rule)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
    return value


def _backend_name(text: str) -> str:
    """argparse ``type=`` of ``--backend``: one of eva_kernels' backend names (lower-cased)."""
    from ..config import check_backend
    try:
        return check_backend(text)
    except EvaError:
        from eva_kernels import BACKEND_NAMES
        raise argparse.ArgumentTypeError(f"{text!r} is not a backend; choose one of "
                                         f"{', '.join(('auto',) + tuple(BACKEND_NAMES))}") from None


def _memory_budget(text: str):
    """argparse ``type=`` of ``--memory-budget``: ``auto`` or a size such as ``8GB``."""
    if text.strip().lower() == "auto":
        return "auto"
    from ..sizes import parse_bytes
    try:
        return parse_bytes(text, "--memory-budget")
    except EvaError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; or auto") from None


def _target_modules(text: str) -> Union[str, List[str]]:
    """argparse ``type=`` of ``--target-modules``: ``"all-linear"`` or a list of module names."""
    if text.strip().lower() == "all-linear":
        return "all-linear"
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no module; give comma-separated names such as "
                                         "query,value, or all-linear")
    return names


def _add_run_options(sp: argparse.ArgumentParser, model_required: bool, targets: str) -> None:
    """The options shared by ``init`` and ``demo`` (``targets``: default of --target-modules)."""
    model_help = ("folder of a transformers model (config.json, the weights and the tokenizer files), or a "
                  ".gguf model file" +
                  ("" if model_required else " (default: the bundled MiniLM)"))
    data_help = ("UTF-8 text file, one calibration sample per non-empty line" +
                 ("" if model_required else " (default: the bundled calibration text)"))
    sp.add_argument("--model", required=model_required, metavar="FOLDER|FILE.gguf", help=model_help)
    sp.add_argument("--data", required=model_required, metavar="TEXTFILE", help=data_help)
    sp.add_argument("--rank", type=_int_at_least(1, "the LoRA rank r"), default=DEFAULT_RANK,
                    help="LoRA rank r; the rank budget is r x number of layers (default: %(default)s)")
    sp.add_argument("--rho", type=_rho, default=EVA_DEFAULTS["rho"],
                    help="max rank per layer = r * rho, finite >= 1 (default: %(default)s)")
    sp.add_argument("--tau", type=_tau, default=EVA_DEFAULTS["tau"],
                    help="cosine threshold for convergence, in [0, 1] (default: %(default)s)")
    sp.add_argument("--batch-size", type=_int_at_least(1, "lines per batch"), default=8,
                    help="lines per batch (default: %(default)s)")
    sp.add_argument("--max-length", type=_int_at_least(2, "tokens per line"), default=128,
                    help="tokens per line, at most the model's positions (default: %(default)s)")
    sp.add_argument("--max-steps", type=_int_at_least(1, "batches"), default=EvaOptions.max_steps,
                    help="stop after this many batches (default: until the data is used up)")
    sp.add_argument("--target-modules", type=_target_modules, default=targets, metavar="NAMES",
                    help="comma-separated module names (a name matches itself or a dotted suffix of a "
                         "layer name: 'output.dense' also matches 'attention.output.dense'; every name must "
                         "match a layer), or all-linear: every nn.Linear / Conv1D layer except the output "
                         "layer (lm_head) and, with --task seq-cls, the classification head; on MiniLM that "
                         "includes pooler.dense (default: %(default)s)")
    sp.add_argument("--task", choices=("auto",) + TASKS, default="auto",
                    help="which model class to calibrate, to match the model you fine-tune: causal-lm "
                         "(AutoModelForCausalLM), seq-cls (AutoModelForSequenceClassification), seq2seq-lm "
                         "(AutoModelForSeq2SeqLM, encoder-decoder models: each line is source and target), base "
                         "(AutoModel); auto: what config.architectures names, seq2seq-lm for an encoder-decoder, "
                         "causal-lm for a .gguf file, else base. The file loads into the other classes too (names "
                         "are mapped) (default: %(default)s)")
    sp.add_argument("--whiten", action="store_true", help="whiten the components (default: off)")
    sp.add_argument("--uncentered", action="store_true",
                    help="uncentred second moment instead of PCA (default: centred)")
    sp.add_argument("--backend", type=_backend_name, default=EvaOptions.backend,
                    help="eva_kernels backend: auto, torch, triton, cpp (default: $EVA_BACKEND, else auto)")
    sp.add_argument("--memory-budget", type=_memory_budget, default=None, metavar="SIZE|auto",
                    help="bound on the statistics' memory, e.g. 8GB or 512MiB; auto: half the free memory. "
                         "When the statistics do not fit at once, the model's blocks are calibrated a window "
                         "at a time (default: no bound)")
    sp.add_argument("--blocks", default=None, metavar="NAME",
                    help="dotted name of the model's block list for --memory-budget runs, e.g. model.layers "
                         "(default: the largest list of same-class layers)")
    sp.add_argument("--offload-device", default=EvaOptions.offload_device, metavar="DEVICE",
                    help="where those runs cache block inputs between windows (default: %(default)s)")
    sp.add_argument("--device", default=None,
                    help="cpu, cuda, cuda:N, mps, ... (default: cuda if available, else cpu)")
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype the model is loaded in; statistics are always fp32 (default: %(default)s)")
    sp.add_argument("--out", default="eva_state_dict.safetensors", metavar="FILE",
                    help="output safetensors file, written atomically (default: %(default)s)")
    sp.add_argument("--plot", default=None, metavar="FILE",
                    help="image of the ranks per layer and module; the extension picks the format "
                         "(.png, .pdf, .svg, ...) (default: no plot)")
    sp.add_argument("--quiet", action="store_true", help="no progress bars (EVA's and transformers' weight loading)")


def build_parser() -> argparse.ArgumentParser:
    """The ``eva`` argument parser with its ``init``, ``demo`` and ``inspect`` commands."""
    p = _Parser(prog="eva", description="EVA (Explained Variance Adaptation) LoRA initialization")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{init,demo,compare,inspect}")
    init = sub.add_parser("init", help="compute EVA components for a model", epilog=_CHECKS,
                          formatter_class=_HelpFormatter,
                          description="Compute EVA components (LoRA A initialisation) of a model from text.")
    _add_run_options(init, True, "all-linear")
    demo = sub.add_parser("demo", help="run on the bundled MiniLM model and calibration text", epilog=_CHECKS,
                          formatter_class=_HelpFormatter,
                          description="eva init on the bundled MiniLM and calibration text; the default targets "
                                      "are the encoder's linear layers without pooler.dense (unused by sentence "
                                      "embeddings).")
    _add_run_options(demo, False, DEMO_TARGETS)
    from .compare_arguments import add_compare as _add_compare  # here: it imports this module
    _add_compare(sub)
    ins = sub.add_parser("inspect", help="print the summary of a saved EVA file")
    ins.add_argument("file", help="a .safetensors file written by eva init")
    return p
