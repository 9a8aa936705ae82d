"""EVA against other LoRA initialisations, fine-tuned on labelled text (``eva compare``, the bench).

:func:`run_comparison` reads and checks the CSV (:mod:`.data`, before any model loads), splits
it (train / validation / test, fixed seed), picks one learning rate for every method (the best
validation accuracy of PEFT's default LoRA init over ``lr_grid``, a short run of ``lr_steps`` with
seed 0; or the given ``lr``), then fine-tunes every method with every seed (:mod:`.training`)
and writes the JSON and the PNG (:mod:`.report`). Classification only.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence

from ..errors import EvaError
from . import report
from .data import calibration_rows, read_labelled_csv, split
from .training import METHODS, accuracy, finetune

DEFAULT_LR_GRID = (1e-4, 3e-4, 1e-3)


def check_methods(methods: Sequence[str]) -> List[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise EvaError(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(METHODS)}")
    return list(methods)


def run_comparison(*, model_path: str, data_path: str, text_column: str, label_column: str, methods: Sequence[str],
                   steps: int, seeds: int, r: int, targets: List[str], batch_size: int, max_length: int,
                   train_size: int, validation_size: int, test_size: int, calibration_size: int,
                   lr: Optional[float], lr_grid: Sequence[float] = DEFAULT_LR_GRID, lr_steps: Optional[int] = None,
                   out_json: str, out_png: str, title: str = "", log: Callable[[str], None] = print) -> dict:
    """The whole comparison (module docstring); returns the JSON payload."""
    methods = check_methods(methods)
    need = train_size + validation_size + test_size
    data = read_labelled_csv(data_path, text_column, label_column, need_rows=need)
    parts = split(data, train_size, validation_size, test_size, seed=0)
    calibration = calibration_rows(parts.train, calibration_size, seed=0)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    common = dict(r=r, targets=targets, batch_size=batch_size, max_length=max_length, num_labels=len(data.classes))
    t_start = time.perf_counter()
    lr_search = []
    if lr is None:  # one learning rate for all methods: the default init's best on validation rows
        for cand in lr_grid:
            run = finetune(model_path, tok, parts.train, parts.validation, calibration, method="lora", seed=0,
                           lr=cand, steps=lr_steps or steps, **common)
            lr_search.append({"lr": cand, "validation accuracy": run.accuracy})
            log(f"lr {cand:g}: validation accuracy {run.accuracy:.4f}")
        lr = max(lr_search, key=lambda x: (x["validation accuracy"], -x["lr"]))["lr"]
        log(f"chosen lr {lr:g}")
    runs = []
    for seed in range(seeds):
        for m in methods:
            res = finetune(model_path, tok, parts.train, parts.test, calibration, method=m, seed=seed, lr=lr, steps=steps,
                           **common)
            runs.append(vars(res))
            log(f"{m:<10} seed {seed}: test accuracy {res.accuracy:.4f}, init {res.init_seconds:.2f} s, "
                f"fine-tune {res.train_seconds:.1f} s")
    rows = report.summary_rows(runs, methods)
    payload = {
        "data": {"path": data_path, "rows": len(data), "classes": data.classes, "train": len(parts.train),
                 "validation": len(parts.validation), "test": len(parts.test), "calibration": len(calibration)},
        "setting": {"model": model_path, "methods": methods, "steps": steps, "seeds": seeds, "r": r, "alpha": r,
                    "rho": 2.0, "targets": targets, "batch_size": batch_size, "max_length": max_length, "lr": lr,
                    "lr_search": lr_search, "lr_rule": "best validation accuracy of the default LoRA init, seed 0"},
        "summary": rows, "runs": runs, "seconds": time.perf_counter() - t_start,
    }
    report.write_json(out_json, payload)
    report.plot(out_png, runs, methods, title or f"{len(parts.train)} training rows, {steps} steps, r={r}, lr={lr:g}")
    return payload


__all__ = ["run_comparison", "METHODS", "accuracy"]
