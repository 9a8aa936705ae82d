"""The work of ``eva init`` / ``eva demo`` (load, compute, print, save, plot) and ``eva inspect``."""
from __future__ import annotations

import contextlib
import os
import time
import warnings

from ..errors import EvaError
from .arguments import one_line
from .preflight import Plan, check_inputs

@contextlib.contextmanager
def _transformers_progress(enabled: bool):
    """Show or hide transformers' own progress bars ("Loading weights") inside the block."""
    from transformers.utils import logging as hf_logging
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def _load(plan: Plan, dtype: str, quiet: bool):
    """(tokenizer, model on the device): the first step that reads weights. The model is the
    ``--task`` class (:mod:`.tasks`), so the result's names are those of the model fine-tuned."""
    import torch
    from transformers import AutoTokenizer

    from .tasks import auto_class
    try:
        tokenizer = AutoTokenizer.from_pretrained(plan.model_folder, **plan.pretrained_kwargs())
    except (OSError, ValueError) as exc:
        raise EvaError(f"--model {plan.model_path!r}: its tokenizer cannot be loaded ({one_line(exc)}); the folder "
                       "needs the tokenizer files written by tokenizer.save_pretrained(folder)") from exc
    try:
        with _transformers_progress(not quiet):
            model = auto_class(plan.task).from_pretrained(plan.model_folder, dtype=getattr(torch, dtype),
                                                          **plan.pretrained_kwargs())
    except (OSError, ValueError) as exc:
        raise EvaError(f"--model {plan.model_path!r}: its weights cannot be loaded ({one_line(exc)}); the folder "
                       "needs the weights written by model.save_pretrained(folder)") from exc
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers find each row's last token by it
    return tokenizer, model.to(plan.device)


def _compute(model, loader, plan: Plan, quiet: bool):
    """Run EVA; returns (state dict, seconds, EVA's own UserWarnings)."""
    from .. import get_eva_state_dict
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = get_eva_state_dict(model, loader, plan.lora_config, show_progress_bar=not quiet, **plan.options)
    from ..engine.run import DISTRIBUTED_NOTE  # the CLI deals the lines to the ranks itself: not for its users
    notes = [w for w in caught if issubclass(w.category, UserWarning) and "eva" in str(w.filename)
             and str(w.message) != DISTRIBUTED_NOTE]
    return sd, time.perf_counter() - t0, notes


def run_command(args, model_path: str, data_path: str) -> int:
    """``eva init`` / ``eva demo``: check everything, load, compute, print, save (and plot).

    Under ``torchrun`` (:mod:`.launch`) every rank computes on its share of the lines and only
    rank 0 prints and writes.
    """
    from .launch import ranks
    plan = check_inputs(args, model_path, data_path)
    with ranks(plan.device) as me:
        plan.device = me.device(plan.device)
        return _run_ranked(args, plan, model_path, data_path, me)


def _run_ranked(args, plan: Plan, model_path: str, data_path: str, me) -> int:
    from .text_data import TextBatches
    quiet = args.quiet or not me.is_main
    t_load = time.perf_counter()
    tokenizer, model = _load(plan, args.dtype, quiet)
    loader = TextBatches(tokenizer, me.shard(plan.lines), batch_size=args.batch_size, max_length=args.max_length,
                         labels=plan.task == "seq2seq-lm")
    load_s = time.perf_counter() - t_load
    sd, elapsed, notes = _compute(model, loader, plan, quiet)
    if not me.is_main:
        return 0
    sd.metadata["provenance"]["source"] = _source(args, plan, model_path, data_path, me.world)
    print(sd.summary())
    for w in notes:
        print(f"note: {w.message}")
    run = sd.metadata["run"]
    shards = f" dealt to {me.world} ranks" if me.world > 1 else ""
    print(f"\nmodel {model_path} (--task {plan.task}: {type(model).__name__})\ndata {data_path}: "
          f"{len(plan.lines)} lines{shards}, batch {args.batch_size} x <= {args.max_length} tokens\n"
          f"loaded in {load_s:.2f} s; EVA {elapsed:.2f} s on {plan.device} ("
          f"{', '.join(f'{op} {name}' for op, name in run['backends'].items())}, {run['orthonormalization']} "
          f"QR): {run['steps']} batches, stop: {run['stop_reason']}, forward+capture "
          f"{run['forward_seconds']:.2f} s, final solve {run['polish_seconds']:.2f} s, statistics "
          f"{run.get('peak_statistics_bytes', 0) / 2**20:.1f} MiB")
    if run.get("mode") == "layer_sequential":
        from ..sizes import format_bytes
        print(f"layer-sequential within memory_budget {format_bytes(run['memory_budget'])}: {len(run['windows'])} "
              f"windows of blocks, block inputs cached {run['peak_cache_bytes'] / 2**20:.1f} MiB")
    comm = run.get("communication")
    if comm:
        steps = comm["bytes_per_step"]
        print(f"{me.world} ranks: {comm['bytes_total'] / 2**20:.1f} MiB all-reduced per rank "
              f"({sum(steps) / max(len(steps), 1) / 2**20:.2f} MiB per step, all-reducing the statistics would be "
              f"{comm['full_statistics_bytes_per_step'] / 2**20:.1f} MiB), {comm['collective_seconds']:.2f} s in "
              "collectives")
    print(f"wrote {sd.save(args.out)}")
    if args.plot:
        from .plot import plot_ranks
        print(f"wrote {plot_ranks(sd.ranks, args.plot, title=f'EVA ranks (r={args.rank}, rho={args.rho})')}")
    return 0


def _source(args, plan: Plan, model_path: str, data_path: str, world: int) -> dict:
    """``provenance["source"]`` of a CLI result: the command, the model and data files (data:
    lines and SHA-256; a GGUF file: its size), and the CLI settings the engine does not record."""
    import shlex

    from ..provenance import file_facts
    model = (file_facts(model_path, content_hash=False) if plan.gguf_file
             else {"path": os.path.abspath(model_path)})
    return {"command": shlex.join(["eva", *getattr(args, "argv", [])]),
            "model": model, "task": plan.task, "data": file_facts(data_path, count_lines=True),
            "batch_size": args.batch_size, "max_length": args.max_length, "dtype": args.dtype,
            "ranks": world}


def inspect_file(path: str) -> int:
    """``eva inspect``: print the summary of a saved file (nothing on stdout if it cannot be read)."""
    from ..result import load_eva_state_dict
    text = load_eva_state_dict(path).describe()
    print(text)
    return 0
