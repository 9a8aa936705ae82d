"""Why does EVA not beat the default init in bench_finetune? One factor changed at a time.

The setting is ``benches/bench_finetune.py``'s (MiniLM + LoRA r=8 on Rotten Tomatoes reviews,
1,200 training rows, 120 steps of 16 reviews, 3 seeds, the same splits and calibration rows). Its
EVA used lr 1e-3 (the default init's best), ``rho=2`` and PEFT's ``adjust_scaling_factors=True``.
Variants, each with the same 3 seeds:

* ``lr``: EVA and the default LoRA init at 3e-4. EVA's ``A`` rows are orthonormal (norm 1), while
  PEFT's Kaiming-uniform rows have norm ~0.58, so one learning rate moves EVA's adapters further.
* ``alpha``: EVA with ``adjust_scaling_factors=False`` (the scaling alpha / r of a layer whose rank
  the redistribution raised or lowered is left as is, instead of rescaled).
* ``rank budget``: EVA with ``rho=1``: every layer keeps r components, no redistribution.

Writes ``benches/results/finetune_eva_ablation_<cpu>.json`` and ``.png``. About 15 minutes.
    python -m benches.bench_finetune_ablation [--seeds 3] [--steps 120]
"""
from __future__ import annotations

import os
import tempfile

from benches import harness
from benches.bench_finetune import SETTING, rotten_tomatoes_csv

SCRIPT = "python -m benches.bench_finetune_ablation"

#: label -> (method, lr, EvaConfig overrides)
VARIANTS = {
    "lora lr 3e-4": ("lora", 3e-4, None),
    "eva lr 3e-4": ("eva", 3e-4, None),
    "eva no alpha rescaling": ("eva", 1e-3, {"adjust_scaling_factors": False}),
    "eva rho=1": ("eva", 1e-3, {"rho": 1.0}),
}


def main(argv=None):
    p = harness.parser(__doc__, SCRIPT, dry_run=False, quick="one variant, 1 seed, 10 steps (a smoke test)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=120)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from eva.cli.arguments import DEMO_TARGETS
    from eva.cli.text_data import bundled_model_path
    from eva.compare import report
    from eva.compare.data import calibration_rows, read_labelled_csv, split
    from eva.compare.training import finetune
    variants = dict(list(VARIANTS.items())[:1]) if args.quick else VARIANTS
    if args.quick:
        args.seeds, args.steps = 1, 10
    out_json = args.out or harness.default_out("finetune_eva_ablation", "cpu", partial=args.quick)
    s = SETTING
    with tempfile.TemporaryDirectory() as tmp:
        data = read_labelled_csv(rotten_tomatoes_csv(tmp), "text", "label",
                                 need_rows=s["train_size"] + s["validation_size"] + s["test_size"])
    parts = split(data, s["train_size"], s["validation_size"], s["test_size"], seed=0)  # run_comparison's split
    calibration = calibration_rows(parts.train, s["calibration_size"], seed=0)
    model = bundled_model_path()
    tok = AutoTokenizer.from_pretrained(model)
    runs = []
    for seed in range(args.seeds):
        for label, (method, lr, options) in variants.items():
            res = finetune(model, tok, parts.train, parts.test, calibration, method=method, seed=seed, lr=lr,
                           steps=args.steps, r=s["r"], targets=DEMO_TARGETS.split(","), batch_size=s["batch_size"],
                           max_length=s["max_length"], num_labels=len(data.classes), eva_options=options)
            run = vars(res)
            run.update(method=label, init=method, eva_options=options)
            runs.append(run)
            print(f"{label:<24} seed {seed}: test accuracy {res.accuracy:.4f}", flush=True)
    labels = list(variants)
    rows = report.summary_rows(runs, labels)
    payload = {"bench": "finetune_eva_ablation", "environment": harness.environment("cpu"),
               "setting": {**s, "steps": args.steps, "seeds": args.seeds, "targets": DEMO_TARGETS.split(","),
                           "variants": {k: {"method": m, "lr": lr, "eva_options": o} for k, (m, lr, o) in variants.items()},
                           "baseline": "benches/results/finetune_movie_reviews_<cpu>.json (lr 1e-3, rho 2, rescaled)"},
               "summary": rows, "runs": runs, "command": SCRIPT}
    report.plot(os.path.splitext(out_json)[0] + ".png", runs, labels,
                f"EVA ablation: MiniLM + LoRA r=8 on Rotten Tomatoes ({args.steps} steps of 16, {args.seeds} seeds)")
    harness.report(out_json, payload, rows, ["method", "lr", "test accuracy", "accuracy sd", "early loss", "final loss"],
                   title="EVA, one factor changed at a time (test accuracy over seeds)")


if __name__ == "__main__":
    main()
