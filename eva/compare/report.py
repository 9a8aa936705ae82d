"""The comparison's outputs: a JSON with every number, a PNG (loss curves, test accuracy) and the
printed table, each stating what its numbers are.

Seed noise: with 2 or more seeds, each method's test accuracy is a range over seeds
(min..max); a method whose range overlaps the baseline's (the first method, PEFT's default LoRA
init by default) is ``"within noise"``, else ``"above noise"`` / ``"below noise"``. With one seed
there is no spread: no ``+-`` is printed and no verdict is given.
"""
from __future__ import annotations

import json
import os
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

from .training import mean_std, smoothed

#: steps averaged for the "final loss" (the last ones)
FINAL_LOSS_STEPS = 20
NOISE_RULE = ("within noise: the seed ranges (min..max) of test accuracy overlap the baseline's; above / below "
              "noise: they do not (a rough check with few seeds, not a significance test)")


def loss_windows(n_steps: int, final: int = FINAL_LOSS_STEPS) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """The steps (1-based, inclusive) of the early loss (the first half) and of the final loss
    (the last ``final``)."""
    return (1, max(1, n_steps // 2)), (max(1, n_steps - final + 1), n_steps)


def steps_text(window: Tuple[int, int]) -> str:
    """``(81, 90)`` as ``"steps 81-90"`` (``"step 1"`` for one step)."""
    lo, hi = window
    return f"steps {lo}-{hi}" if hi > lo else f"step {lo}"


def _mean_over(losses: Sequence[float], window: Tuple[int, int]) -> float:
    """The mean of ``losses`` over the 1-based inclusive ``window``."""
    part = losses[window[0] - 1:window[1]]
    return sum(part) / len(part)


def noise_verdict(values: Sequence[float], baseline: Sequence[float]) -> str:
    """``"within noise"`` when the ranges (min..max) of ``values`` and ``baseline`` overlap, else
    ``"above noise"`` or ``"below noise"``."""
    if min(values) > max(baseline):
        return "above noise"
    if max(values) < min(baseline):
        return "below noise"
    return "within noise"


def summary_rows(runs: List[dict], methods: List[str]) -> List[dict]:
    """Per method, over seeds: test accuracy (mean; with 2+ seeds also sd, min, max and the
    verdict against the first method, ``"vs baseline"``; ``None`` with one seed); the mean loss
    of the first half of the steps (how fast it fell) and of the last :data:`FINAL_LOSS_STEPS`
    steps, with the steps named; the init time as a share of the fine-tuning time."""
    accs = {m: [r["accuracy"] for r in runs if r["method"] == m] for m in methods}
    rows = []
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        several = len(mine) > 1
        early_w, final_w = loss_windows(len(mine[0]["losses"]))
        acc, acc_sd = mean_std(accs[m])
        loss, loss_sd = mean_std([_mean_over(r["losses"], final_w) for r in mine])
        early = mean_std([_mean_over(r["losses"], early_w) for r in mine])[0]
        init = sum(r["init_seconds"] for r in mine) / len(mine)
        train = sum(r["train_seconds"] for r in mine) / len(mine)
        verdict = ("baseline" if m == methods[0] else noise_verdict(accs[m], accs[methods[0]])) if several else None
        rows.append({"method": m, "seeds": len(mine), "lr": mine[0]["lr"], "test accuracy": acc,
                     "accuracy sd": acc_sd if several else None,
                     "accuracy min": min(accs[m]) if several else None,
                     "accuracy max": max(accs[m]) if several else None, "vs baseline": verdict,
                     "early loss": early, "early loss steps": steps_text(early_w), "final loss": loss,
                     "final loss steps": steps_text(final_w), "loss sd": loss_sd if several else None,
                     "init s": init, "fine-tune s": train, "init / fine-tune": init / train if train else float("nan")})
    return rows


def noise_summary(rows: List[dict]) -> dict:
    """The seed-noise verdicts of :func:`summary_rows` for the JSON: the baseline, the rule, and
    per method its verdict (``None`` with one seed, where no spread exists)."""
    several = rows[0]["seeds"] > 1
    return {"baseline": rows[0]["method"], "seeds": rows[0]["seeds"],
            "rule": NOISE_RULE if several else "one seed: no spread, no verdict; run 2 or more seeds",
            "verdicts": {r["method"]: r["vs baseline"] for r in rows[1:]}}


def majority_rate(labels: Sequence[int]) -> Tuple[float, int]:
    """The accuracy of always predicting the most common label, and that label."""
    top = max(sorted(set(labels)), key=list(labels).count)
    return list(labels).count(top) / len(labels), top


def _aligned(header: List[str], cells: List[List[str]]) -> List[str]:
    """Lines of a plain table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(c) for c in col) for col in zip(header, *cells)]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
            for line in [header, *cells]]


def _accuracy_table(rows: List[dict]) -> List[str]:
    """Lines of the accuracy table: the range over seeds and ``vs <baseline>`` only with 2+ seeds."""
    several, base = rows[0]["seeds"] > 1, rows[0]["method"]
    head = f"test accuracy (mean, min..max of {rows[0]['seeds']} seeds)" if several else "test accuracy (1 seed)"
    cells = [[r["method"], f"{r['lr']:.0e}", f"{r['test accuracy']:.4f}" +
              (f" ({r['accuracy min']:.4f}..{r['accuracy max']:.4f})" if several else "")] +
             ([r["vs baseline"]] if several else []) for r in rows]
    return _aligned(["method", "lr", head] + ([f"vs {base}"] if several else []), cells)


def _loss_table(rows: List[dict]) -> List[str]:
    """Lines of the loss and time table; the loss headers name their steps."""
    head = ["method", f"early loss (mean of {rows[0]['early loss steps']})",
            f"final loss (mean of {rows[0]['final loss steps']})", "init s", "fine-tune s", "init share"]
    cells = [[r["method"], f"{r['early loss']:.4f}", f"{r['final loss']:.4f}", f"{r['init s']:.2f}",
              f"{r['fine-tune s']:.1f}", f"{r['init / fine-tune']:.1%}"] for r in rows]
    return _aligned(head, cells)


def format_summary(rows: List[dict], *, test_rows: Optional[int] = None,
                   chance: Optional[Tuple[float, str]] = None) -> str:
    """The printed tables of :func:`summary_rows` (accuracy; loss and time) with their notes.
    ``test_rows``: the rows one accuracy is measured on; ``chance``: (accuracy, what it is)."""
    base = rows[0]["method"]
    notes = [f"vs {base}: {NOISE_RULE}" if rows[0]["seeds"] > 1 else
             "one seed: no spread, so no difference can be told from seed noise; run 2 or more seeds (--seeds)"]
    if test_rows:
        notes.append(f"{test_rows} test rows: one row = {1 / test_rows:.4f} of accuracy" +
                     (f"; chance ({chance[1]}) = {chance[0]:.4f}" if chance else ""))
    loss_note = ("loss: training loss, mean over those steps and the seeds; init: PEFT's wrapping plus EVA's "
                 "calibration (not the checkpoint load)")
    return "\n".join(_accuracy_table(rows) + notes + [""] + _loss_table(rows) + [loss_note])


def write_json(path: str, payload: dict) -> str:
    """Write ``payload`` to ``path`` atomically (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def _draw_losses(ax, runs: List[dict], methods: List[str], window: int) -> Dict[str, str]:
    """Per method the smoothed loss (mean over seeds, band min..max) on integer steps; the colours."""
    from matplotlib.ticker import MaxNLocator
    colours: Dict[str, str] = {}
    for m in methods:
        curves = [smoothed(r["losses"], window) for r in runs if r["method"] == m]
        n = len(curves[0])
        steps = range(1, n + 1)
        (line,) = ax.plot(steps, [sum(c[s] for c in curves) / len(curves) for s in range(n)], label=m, lw=1.6)
        colours[m] = line.get_color()
        ax.fill_between(steps, [min(c[s] for c in curves) for s in range(n)],
                        [max(c[s] for c in curves) for s in range(n)], color=colours[m], alpha=0.18, lw=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(f"training loss ({window}-step mean; band: min..max over seeds)")
    ax.legend()
    return colours


def _draw_accuracy(ax, runs: List[dict], methods: List[str], colours: Dict[str, str],
                   chance: Optional[Tuple[float, str]], test_rows: Optional[int]) -> None:
    """Bars (mean test accuracy) and dots (seeds) on a 0..1 axis, the chance line, and under
    each method its seed-noise verdict against the first method (2 or more seeds)."""
    rows = summary_rows(runs, methods)
    for i, m in enumerate(methods):
        accs = [r["accuracy"] for r in runs if r["method"] == m]
        ax.bar(i, sum(accs) / len(accs), color=colours[m], alpha=0.7)
        ax.scatter([i] * len(accs), accs, color="black", s=12, zorder=3)
    if chance:
        label = f"chance = {chance[0]:.3f}:\n" + textwrap.fill(chance[1], 30)
        ax.axhline(chance[0], color="0.3", ls="--", lw=1.2, zorder=4, label=label)
        ax.legend(loc="upper left", fontsize=7.5)
    ax.set_xticks(range(len(methods)), [f"{r['method']}\n{r['vs baseline']}" if r["vs baseline"] else r["method"]
                                        for r in rows], fontsize=8)
    ax.set_yticks([i / 10 for i in range(11)])
    ax.set_ylim(0.0, 1.2)  # from 0: bar heights are proportional; the top leaves room for the legend
    one_row = f"; 1 test row = {1 / test_rows:.4f}" if test_rows else ""
    ax.set_ylabel(f"test accuracy\n(bar: mean, dots: seeds{one_row})", fontsize=9)


def figure(runs: List[dict], methods: List[str], title: str, window: int = 10,
           chance: Optional[Tuple[float, str]] = None, test_rows: Optional[int] = None):
    """The matplotlib figure of :func:`plot` (axes: loss, accuracy); the caller closes it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    colours = _draw_losses(ax_loss, runs, methods, window)
    _draw_accuracy(ax_acc, runs, methods, colours, chance, test_rows)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot(path: str, runs: List[dict], methods: List[str], title: str, window: int = 10,
         chance: Optional[Tuple[float, str]] = None, test_rows: Optional[int] = None) -> str:
    """Write :func:`figure` to ``path``: training loss (moving average of ``window`` steps: mean
    over seeds, band min..max) and the test accuracy per method on a 0..1 axis (bar: mean, dots:
    seeds) with ``chance`` = (accuracy, what it is) as a dashed line."""
    fig = figure(runs, methods, title, window, chance, test_rows)
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
