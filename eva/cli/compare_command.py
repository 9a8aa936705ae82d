"""``eva compare``: :func:`eva.compare.run_comparison` on the user's CSV, then a summary table."""
from __future__ import annotations

import os
import sys

from ..errors import EvaError
from .arguments import one_line


def compare_command(args) -> int:
    """Run the comparison and print its table; split sizes passed that the CSV cannot hold end it
    with one line ``eva compare: error: ...`` (exit code 2), like argparse's own errors."""
    from ..compare import check_methods, run_comparison
    from ..compare.report import format_summary
    from ..compare.splits import SizeError
    from .text_data import bundled_model_path
    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    model = args.model or bundled_model_path()
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise EvaError(f"--model {model!r}: not a transformers model folder (no config.json)")
    targets = args.target_modules if isinstance(args.target_modules, list) else args.target_modules.split(",")
    try:
        payload = run_comparison(
            model_path=model, data_path=args.data, text_column=args.text_column, label_column=args.label_column,
            methods=methods, steps=args.steps, seeds=args.seeds, r=args.rank, targets=targets,
            batch_size=args.batch_size, max_length=args.max_length, train_size=args.train_size,
            validation_size=args.validation_size, test_size=args.test_size,
            calibration_size=args.calibration_size, lr=args.lr, lr_steps=max(1, args.steps // 2),
            lr_per_method=args.lr_per_method, out_json=args.out_json, out_png=args.out_png)
    except SizeError as exc:
        print(f"eva compare: error: {one_line(exc)} (see `eva compare --help`)", file=sys.stderr)
        return 2
    data = payload["data"]
    print()
    print(format_summary(payload["summary"], test_rows=data["test"],
                         chance=(data["chance accuracy"], data["chance"])))
    print(f"learning rate: {payload['setting']['lr_rule']}; wrote {args.out_json} and {args.out_png}")
    return 0
