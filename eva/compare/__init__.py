"""EVA against other LoRA initialisations, fine-tuned on labelled text (``eva compare``, the bench).

:func:`run_comparison` reads and checks the CSV (:mod:`.data`, before any model loads), splits
it (train / validation / test, fixed seed; sizes not given are the defaults, scaled down to a
small CSV: :mod:`.splits`), picks one learning rate for every method (the best
validation accuracy of PEFT's default LoRA init over ``lr_grid``, a short run of ``lr_steps`` with
seed 0; or the given ``lr``; or, with ``lr_per_method``, the same search for each method on its
own init), then fine-tunes every method with every seed (:mod:`.training`)
and writes the JSON and the PNG (:mod:`.report`). Classification only.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import EvaError
from . import report
from .data import Labelled, calibration_rows, read_labelled_csv, split
from .splits import fit_sizes
from .training import METHODS, accuracy, finetune

#: learning rates tried by the default LoRA init (short runs, validation accuracy). On the bench's
#: MiniLM setting 1e-4 left every method at chance after 120 steps (loss ~ ln 2), so the grid
#: starts at 3e-4.
DEFAULT_LR_GRID = (3e-4, 1e-3, 3e-3)


def check_methods(methods: Sequence[str]) -> List[str]:
    """``methods`` as a list; :class:`EvaError` naming the unknown ones (or an empty list)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise EvaError(f"--methods: unknown {unknown or 'empty list'}; choose from {', '.join(METHODS)}")
    return list(methods)


def run_comparison(*, model_path: str, data_path: str, text_column: str, label_column: str, methods: Sequence[str],
                   steps: int, seeds: int, r: int, targets: List[str], batch_size: int, max_length: int,
                   train_size: Optional[int] = None, validation_size: Optional[int] = None,
                   test_size: Optional[int] = None, calibration_size: Optional[int] = None,
                   lr: Optional[float], lr_grid: Sequence[float] = DEFAULT_LR_GRID, lr_steps: Optional[int] = None,
                   lr_per_method: bool = False,
                   out_json: str, out_png: str, title: str = "", log: Callable[[str], None] = print) -> dict:
    """The whole comparison (module docstring); returns the JSON payload. A size left ``None`` is
    the default, scaled down when the CSV is smaller (said in one ``log`` line); sizes given that
    do not fit raise :class:`~.splits.SizeError`."""
    methods = check_methods(methods)
    data = read_labelled_csv(data_path, text_column, label_column)
    sizes = fit_sizes(len(data), train=train_size, validation=validation_size, test=test_size,
                      calibration=calibration_size, source=f"--data {data_path!r}")
    if sizes.note:
        log(sizes.note)
    parts = split(data, sizes.train, sizes.validation, sizes.test, seed=0)
    calibration = calibration_rows(parts.train, sizes.calibration, seed=0)
    chance = chance_of(parts.test)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    common = dict(r=r, targets=targets, batch_size=batch_size, max_length=max_length, num_labels=len(data.classes))
    t_start = time.perf_counter()
    lr_search: List[dict] = []

    def search(method: str) -> float:  # the best validation accuracy over the grid (ties: the smaller rate)
        mine = []
        for cand in lr_grid:
            run = finetune(model_path, tok, parts.train, parts.validation, calibration, method=method, seed=0,
                           lr=cand, steps=lr_steps or steps, **common)
            mine.append({"method": method, "lr": cand, "validation accuracy": run.accuracy})
            log(f"{method}: lr {cand:g}: validation accuracy {run.accuracy:.4f}")
        lr_search.extend(mine)
        best = max(mine, key=lambda x: (x["validation accuracy"], -x["lr"]))["lr"]
        log(f"{method}: chosen lr {best:g}")
        return best

    if lr is not None:
        lrs = {m: lr for m in methods}
    elif lr_per_method:  # every method gets the same search, on its own init
        lrs = {m: search(m) for m in methods}
    else:  # one learning rate for all methods: the default init's best on validation rows
        best = search("lora")
        lrs = {m: best for m in methods}
    runs = []
    for seed in range(seeds):
        for m in methods:
            res = finetune(model_path, tok, parts.train, parts.test, calibration, method=m, seed=seed, lr=lrs[m],
                           steps=steps, **common)
            runs.append(vars(res))
            log(f"{m:<10} seed {seed}: test accuracy {res.accuracy:.4f}, init {res.init_seconds:.2f} s, "
                f"fine-tune {res.train_seconds:.1f} s (load {res.load_seconds:.2f} s)")
    rows = report.summary_rows(runs, methods)
    payload = {
        "data": {"path": data_path, "rows": len(data), "classes": data.classes, "train": len(parts.train),
                 "validation": len(parts.validation), "test": len(parts.test), "calibration": len(calibration),
                 "sizes scaled down": sizes.note or None, "chance accuracy": chance[0],
                 "chance": chance[1]},
        "setting": {"model": model_path, "methods": methods, "steps": steps, "seeds": seeds, "r": r, "alpha": r,
                    "rho": 2.0, "targets": targets, "batch_size": batch_size, "max_length": max_length, "lr": lrs,
                    "lr_search": lr_search,
                    "lr_rule": ("given" if lr is not None else
                                "per method: its best validation accuracy over the grid, seed 0, half-length runs"
                                if lr_per_method else
                                "one for all: the best validation accuracy of the default LoRA init over the grid, "
                                "seed 0, half-length runs"),
                    "init_seconds": "PEFT's wrapping (PiSSA/OLoRA decompositions) + EVA's calibration run; "
                                    "not the checkpoint load (load_seconds, the same for every method)"},
        "summary": rows, "seed noise": report.noise_summary(rows), "runs": runs,
        "seconds": time.perf_counter() - t_start,
    }
    report.write_json(out_json, payload)
    report.plot(out_png, runs, methods, title or f"{len(parts.train)} training rows, {steps} steps, r={r}, "
                f"lr={', '.join(f'{m} {v:g}' for m, v in lrs.items()) if lr_per_method else f'{lrs[methods[0]]:g}'}",
                chance=chance, test_rows=len(parts.test))
    return payload


def chance_of(test: Labelled) -> Tuple[float, str]:
    """The accuracy of always answering the test split's most common class, and what it is."""
    rate, top = report.majority_rate(test.labels)
    return rate, f"majority class {test.classes[top]!r} of the test split"


__all__ = ["run_comparison", "METHODS", "accuracy"]
