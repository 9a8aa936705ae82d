"""``eva compare``: :func:`eva.compare.run_comparison` on the user's CSV, then a summary table."""
from __future__ import annotations

import os

from ..errors import EvaError


def compare_command(args) -> int:
    from ..compare import check_methods, run_comparison
    from .text_data import bundled_model_path
    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    model = args.model or bundled_model_path()
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise EvaError(f"--model {model!r}: not a transformers model folder (no config.json)")
    targets = args.target_modules if isinstance(args.target_modules, list) else args.target_modules.split(",")
    payload = run_comparison(
        model_path=model, data_path=args.data, text_column=args.text_column, label_column=args.label_column,
        methods=methods, steps=args.steps, seeds=args.seeds, r=args.rank, targets=targets,
        batch_size=args.batch_size, max_length=args.max_length, train_size=args.train_size,
        validation_size=args.validation_size, test_size=args.test_size, calibration_size=args.calibration_size,
        lr=args.lr, lr_steps=max(1, args.steps // 2), lr_per_method=args.lr_per_method, out_json=args.out_json,
        out_png=args.out_png)
    print(f"\n{'method':<11} {'lr':>7} {'test accuracy':>15} {'early loss':>11} {'final loss':>11} {'init s':>8} "
          f"{'fine-tune s':>12} {'init share':>11}")
    for row in payload["summary"]:
        print(f"{row['method']:<11} {row['lr']:>7.0e} {row['test accuracy']:>8.4f} +- {row['accuracy sd']:.4f} "
              f"{row['early loss']:>11.4f} "
              f"{row['final loss']:>11.4f} "
              f"{row['init s']:>8.2f} {row['fine-tune s']:>12.1f} {row['init / fine-tune']:>10.1%}")
    print(f"early loss: mean over the first half of the steps; final loss: the last 20 steps; init: PEFT's "
          f"wrapping plus EVA's calibration (not the checkpoint load)\nlearning rate: {payload['setting']['lr_rule']}; "
          f"wrote {args.out_json} and {args.out_png}")
    return 0
