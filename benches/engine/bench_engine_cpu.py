"""End-to-end EVA on CPU: eva-kernels vs the forward passes alone vs PEFT's EVA.

Setting (issue 2): the bundled MiniLM, batches of 4 x 128 tokens of real text (Python
standard-library docstrings, :mod:`benches.text_corpus`), r=8, rho=2, tau=0.99, targets
query/key/value/dense of the encoder. Measures wall time (median of ``--repeats``) of

  (a) the forward passes alone over exactly the batches our run consumed,
  (b) ``eva.get_eva_state_dict``,
  (c) ``peft.tuners.lora.eva.get_eva_state_dict`` on the same loader (it cycles the loader
      until converged and does one extra forward to find shared inputs; its ``batches`` are
      the forward passes it ran, that one included; ``--peft-max-steps`` caps them),

then, in separate untimed runs that record every token each layer consumed (ours: the
``eva.testing.TokenRecorder`` observer; PEFT: what each of its IncrementalPCA was fed), the
subspace overlap of each method's components with the exact PCA (float64 SVD,
``eva_kernels.testing.exact_pca``) of those tokens. Writes
``benches/results/engine_cpu_<cpu>.json``.

Run from the repository root (``make bench-cpu`` runs the first):
    python -m benches.engine.bench_engine_cpu [--batches 200] [--repeats 3] [--no-peft] [--no-overlap] [--out FILE]
    python -m benches.engine.bench_engine_cpu --quick    (8 batches, 1 repeat, PEFT capped: a smoke test)
"""
from __future__ import annotations

import os

import torch

from benches import harness
from benches.engine.common import add_compare_args, add_eva_args, compare_on_cpu, lora_eva_config
from benches.text_corpus import stdlib_passages

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCRIPT = "python -m benches.engine.bench_engine_cpu"
TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)"
#: the layers that read one input (PEFT hooks one of them)
SHARED_INPUTS = (("query", "key", "value"),)


def parse_args(argv=None):
    p = harness.parser(__doc__, SCRIPT, dry_run=False,
                       quick="at most 8 batches, 1 repeat, PEFT capped at 12 forwards (a smoke test)")
    add_eva_args(p, batches=200, batch_size=4, r=8)
    add_compare_args(p, repeats=3)
    p.add_argument("--check-every", type=lambda t: t if t == "auto" else int(t), default=1,
                   help="EVA option check_every: batches between solves, or auto")
    p.add_argument("--batch-solves", choices=["auto", "on", "off"], default="auto",
                   help="EVA option batch_solves (default: the library's default, auto: per group on CPU)")
    return p.parse_args(argv)


def build(batches: int, batch_size: int, max_length: int):
    from transformers import AutoModel, AutoTokenizer
    from eva.cli.text_data import bundled_model_path
    path = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    passages = stdlib_passages(limit=batches * batch_size)
    loader = []
    for i in range(0, len(passages) - batch_size + 1, batch_size):
        enc = tok(passages[i:i + batch_size], padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="pt")
        loader.append(dict(enc))
    return model, loader


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.batches, args.repeats, args.peft_max_steps = min(args.batches, 8), 1, args.peft_max_steps or 12
    torch.manual_seed(0)
    model, loader = build(args.batches, args.batch_size, args.max_length)
    cfg = lora_eva_config(TARGETS, args.r, args.rho, args.tau)
    options = dict(check_every=args.check_every,
                   batch_solves={"auto": "auto", "on": True, "off": False}[args.batch_solves])
    compare_on_cpu(model, loader, cfg, args, options, SHARED_INPUTS, "engine_cpu", "EVA end to end, MiniLM, CPU")

if __name__ == "__main__":
    main()
