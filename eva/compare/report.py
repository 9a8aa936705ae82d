"""The comparison's outputs: a JSON with every number and a PNG (loss curves, test accuracy)."""
from __future__ import annotations

import json
import os
from typing import Dict, List

from .training import mean_std, smoothed


def summary_rows(runs: List[dict], methods: List[str]) -> List[dict]:
    """Per method, over seeds: test accuracy (mean, sd); the mean loss of the first half of the
    steps (how fast it fell: the area under the curve); the mean loss of the last 20 steps; the
    init time as a share of the fine-tuning time."""
    rows = []
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        acc, acc_sd = mean_std([r["accuracy"] for r in mine])
        tail = [sum(r["losses"][-20:]) / len(r["losses"][-20:]) for r in mine]
        loss, loss_sd = mean_std(tail)
        early = mean_std([sum(r["losses"][:max(1, len(r["losses"]) // 2)]) / max(1, len(r["losses"]) // 2)
                          for r in mine])[0]
        init = sum(r["init_seconds"] for r in mine) / len(mine)
        train = sum(r["train_seconds"] for r in mine) / len(mine)
        rows.append({"method": m, "seeds": len(mine), "lr": mine[0]["lr"], "test accuracy": acc, "accuracy sd": acc_sd,
                     "early loss": early, "final loss": loss, "loss sd": loss_sd, "init s": init, "fine-tune s": train,
                     "init / fine-tune": init / train if train else float("nan")})
    return rows


def write_json(path: str, payload: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def plot(path: str, runs: List[dict], methods: List[str], title: str, window: int = 10) -> str:
    """Training loss (moving average of ``window`` steps: mean over seeds, band min..max) and the
    test accuracy per method (bar: mean, dots: seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    colours: Dict[str, str] = {}
    for i, m in enumerate(methods):
        curves = [smoothed(r["losses"], window) for r in runs if r["method"] == m]
        steps = range(1, len(curves[0]) + 1)
        mean = [sum(c[s] for c in curves) / len(curves) for s in range(len(curves[0]))]
        lo = [min(c[s] for c in curves) for s in range(len(curves[0]))]
        hi = [max(c[s] for c in curves) for s in range(len(curves[0]))]
        (line,) = ax_loss.plot(steps, mean, label=m, lw=1.6)
        colours[m] = line.get_color()
        ax_loss.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
        accs = [r["accuracy"] for r in runs if r["method"] == m]
        ax_acc.bar(i, sum(accs) / len(accs), color=colours[m], alpha=0.7)
        ax_acc.scatter([i] * len(accs), accs, color="black", s=12, zorder=3)
    ax_loss.set_xlabel("optimiser step")
    ax_loss.set_ylabel(f"training loss ({window}-step mean; band: min..max over seeds)")
    ax_loss.legend()
    ax_acc.set_xticks(range(len(methods)), methods, rotation=20)
    ax_acc.set_ylabel("test accuracy (bar: mean, dots: seeds)")
    accs_all = [r["accuracy"] for r in runs]
    ax_acc.set_ylim(max(0.0, min(accs_all) - 0.05), min(1.0, max(accs_all) + 0.03))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
