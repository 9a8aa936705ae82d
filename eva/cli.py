"""Command line: ``eva init``, ``eva demo``, ``eva inspect``.

    eva init --model PATH --data TEXTFILE [--rank 8 --rho 2 --tau 0.99 --batch-size 8
             --max-length 128 --target-modules query,key,value,dense --out FILE --plot FILE]
    eva demo      # bundled MiniLM + bundled calibration text
    eva inspect FILE.safetensors
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eva", description="EVA (Explained Variance Adaptation) LoRA initialization")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, model_required: bool):
        sp.add_argument("--model", required=model_required, help="folder of a transformers model (+ tokenizer)")
        sp.add_argument("--data", required=model_required, help="text file, one sample per non-empty line")
        sp.add_argument("--rank", type=int, default=8, help="LoRA rank r (budget = r x number of layers)")
        sp.add_argument("--rho", type=float, default=2.0, help="max rank per layer = r * rho")
        sp.add_argument("--tau", type=float, default=0.99, help="cosine threshold for convergence")
        sp.add_argument("--batch-size", type=int, default=8)
        sp.add_argument("--max-length", type=int, default=128)
        sp.add_argument("--max-steps", type=int, default=None, help="stop after this many batches")
        sp.add_argument("--target-modules", default=None,
                        help="comma-separated module names, or all-linear (default: all-linear; demo: "
                             "query,key,value,dense)")
        sp.add_argument("--whiten", action="store_true")
        sp.add_argument("--uncentered", action="store_true", help="uncentred second moment instead of PCA")
        sp.add_argument("--backend", default=None, help="eva_kernels backend: auto, torch, triton, cpp")
        sp.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype the model is loaded in (statistics are always accumulated in fp32)")
        sp.add_argument("--out", default="eva_state_dict.safetensors", help="output safetensors file")
        sp.add_argument("--plot", default=None, help="PNG of ranks per layer and module")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    common(sub.add_parser("init", help="compute EVA components for a model"), True)
    common(sub.add_parser("demo", help="run on the bundled MiniLM model and calibration text"), False)
    ins = sub.add_parser("inspect", help="print the summary of a saved EVA file")
    ins.add_argument("file")
    return p


def _run(args, model_path: str, data_path: str, default_targets: str) -> int:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from . import get_eva_state_dict
    from .plot import plot_ranks
    from .text_data import TextBatches, read_lines

    try:
        from peft import LoraConfig
        from peft.tuners.lora.config import EvaConfig
    except ImportError:
        print("eva: this command needs peft (pip install peft)", file=sys.stderr)
        return 2
    targets = args.target_modules or default_targets
    target_modules = "all-linear" if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t_load = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path, dtype=getattr(torch, args.dtype)).to(device)
    lines = read_lines(data_path)
    loader = TextBatches(tokenizer, lines, batch_size=args.batch_size, max_length=args.max_length)
    config = LoraConfig(r=args.rank, target_modules=target_modules, init_lora_weights="eva",
                        eva_config=EvaConfig(rho=args.rho, tau=args.tau, whiten=args.whiten))
    load_s = time.perf_counter() - t_load
    options = {"centered": not args.uncentered, "max_steps": args.max_steps, "backend": args.backend}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sd = get_eva_state_dict(model, loader, config, show_progress_bar=not args.quiet, **options)
    elapsed = time.perf_counter() - t0
    print(sd.summary())
    for w in caught:
        if issubclass(w.category, UserWarning) and "eva" in str(w.filename):
            print(f"note: {w.message}")
    run = sd.metadata["run"]
    print(f"\nmodel {model_path}\ndata {data_path}: {len(lines)} lines, batch {args.batch_size} x <= {args.max_length} "
          f"tokens\nloaded in {load_s:.2f} s; EVA {elapsed:.2f} s on {device} (backend {run['backend']}): "
          f"{run['steps']} batches, stop: {run['stop_reason']}, forward+capture {run['forward_seconds']:.2f} s, "
          f"final solve {run['polish_seconds']:.2f} s")
    print(f"wrote {sd.save(args.out)}")
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        print(f"wrote {plot_ranks(sd.ranks, args.plot, title=f'EVA ranks (r={args.rank}, rho={args.rho})')}")
    return 0


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    from .errors import EvaError
    try:
        if args.cmd == "inspect":
            from .result import load_eva_state_dict
            print(load_eva_state_dict(args.file).summary())
            return 0
        if args.cmd == "demo":
            from .text_data import bundled_calibration_path, bundled_model_path
            return _run(args, args.model or bundled_model_path(), args.data or bundled_calibration_path(),
                        "query,key,value,dense")
        return _run(args, args.model, args.data, "all-linear")
    except (EvaError, OSError) as exc:  # OSError: missing --model folder, missing file for inspect
        print(f"eva: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
