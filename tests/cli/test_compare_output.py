"""``eva compare`` output that cannot be misread: ``--help`` states every default; a small CSV
scales the default splits down (one line says so) while passed sizes that do not fit are refused
with sizes that do (and those work); the table shows a seed spread and noise verdicts only with
2+ seeds; the figure's accuracy axis starts at 0 with a chance line and the loss axis has integer
steps. Fine-tuning is replaced by a fake (or synthetic results), so every test takes a second."""
from __future__ import annotations

import csv
import json
import re

import pytest

from eva.cli import build_parser, main
from eva.compare import report
from eva.compare.splits import DEFAULT_CALIBRATION, DEFAULT_SIZES, SizeError, fit_sizes


def write_csv(path, n):
    """``n`` rows of two classes (``i % 2``) with distinct texts."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(("text", "label"))
        w.writerows((f"review number {i}", str(i % 2)) for i in range(n))
    return str(path)


@pytest.fixture
def fake_training(monkeypatch):
    """No tokenizer, no model: each run's accuracy is 0.5 + 0.01 * seed (+0.2 for eva)."""
    import transformers

    import eva.compare as compare
    from eva.compare.training import RunResult

    def fake_finetune(model_path, tok, train, evaluate, calibration, *, method, seed, lr, steps, **common):
        return RunResult(method, seed, lr, losses=[1.0 / (i + 1) for i in range(steps)],
                         accuracy=0.5 + 0.01 * seed + (0.2 if method == "eva" else 0.0), init_seconds=0.1,
                         train_seconds=1.0)
    monkeypatch.setattr(compare, "finetune", fake_finetune)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)


def compare_cli(tmp_path, capsys, *args):
    """``eva compare`` with tiny settings; returns (exit code, stdout, stderr, the JSON or None)."""
    out_json = tmp_path / "c.json"
    rc = main(["compare", "--methods", "lora,eva", "--steps", "4", "--seeds", "2", "--lr", "1e-3",
               "--out-json", str(out_json), "--out-png", str(tmp_path / "c.png"), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err, json.loads(out_json.read_text()) if out_json.exists() else None


# --help -------------------------------------------------------------------------------------

def _compare_parser():
    """The ``compare`` subparser of ``eva``'s parser."""
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    return sub.choices["compare"]


def test_help_states_every_default():
    parser = _compare_parser()
    text = parser.format_help()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and ("(default: " in action.help or action.required), action.option_strings
    flat = " ".join(text.split())
    for expected in ("--steps STEPS optimiser steps per run (default: 90)", "(default: 3)", "(default: 1200,",
                     "(default: 200,", "(default: 400,", "(default: 64,", "(default: lora,eva,pissa)",
                     "(default: eva_compare.json)", "(default: 8)"):
        assert expected in flat, expected


def test_help_defaults_are_the_library_defaults():
    from eva.cli.compare_arguments import SPLIT_DEFAULTS
    assert SPLIT_DEFAULTS == {**DEFAULT_SIZES, "calibration": DEFAULT_CALIBRATION}


# split sizes ------------------------------------------------------------------------------

def test_default_splits_scale_down_in_proportion():
    sizes = fit_sizes(600)
    assert (sizes.train, sizes.validation, sizes.test, sizes.calibration) == (400, 66, 133, 64)
    small = fit_sizes(60)
    assert (small.train, small.validation, small.test) == (40, 6, 13)
    assert small.calibration == 40  # never more than the training rows
    assert fit_sizes(1800).note == "" and fit_sizes(1800).train == 1200  # the defaults fit: unchanged
    assert fit_sizes(4).train + fit_sizes(4).validation + fit_sizes(4).test == 4


def test_small_csv_uses_scaled_splits_and_says_so(tmp_path, capsys, fake_training):
    rc, out, err, payload = compare_cli(tmp_path, capsys, "--data", write_csv(tmp_path / "d.csv", 60))
    assert rc == 0, err
    lines = [line for line in out.splitlines() if line.startswith("splits: ")]
    assert len(lines) == 1 and lines[0].endswith(
        "has 60 rows, too few for the default --train-size 1200 --validation-size 200 --test-size 400; scaled down "
        "to --train-size 40 --validation-size 6 --test-size 13 --calibration-size 40"), lines
    data = payload["data"]
    assert (data["train"], data["validation"], data["test"], data["calibration"]) == (40, 6, 13, 40)
    assert data["sizes scaled down"] == lines[0]


@pytest.mark.parametrize("rows,passed,expect", [
    (600, ["--train-size", "1000", "--validation-size", "200", "--test-size", "400"],
     "--train-size 1000 --validation-size 200 --test-size 400 need 1600 rows, but --data '{path}' has 600; sizes "
     "that fit (the same proportions): --train-size 375 --validation-size 75 --test-size 150;"),
    (600, ["--train-size", "599"],
     "--train-size 599 leaves 1 of the 600 rows of --data '{path}' for --validation-size and --test-size (at least "
     "2); sizes that fit: --train-size 299"),
    (60, ["--calibration-size", "50"], "--calibration-size 50 is more than the 40 training rows (EVA calibrates on "
                                       "training rows only); pass --calibration-size 40 or less"),
], ids=["all-three", "train-only", "calibration"])
def test_passed_sizes_that_do_not_fit_are_refused_and_the_fix_works(tmp_path, capsys, fake_training, rows, passed,
                                                                     expect):
    path = write_csv(tmp_path / "d.csv", rows)
    rc, out, err, payload = compare_cli(tmp_path, capsys, "--data", path, *passed)
    assert rc == 2 and payload is None
    assert err.count("\n") == 1 and err.startswith("eva compare: error: "), err
    assert expect.format(path=path) in err, err
    fix = re.search(r"(?:sizes that fit(?: \(the same proportions\))?:|pass) ((?:--[a-z-]+ \d+ ?)+)", err).group(1)
    rc, out, err, payload = compare_cli(tmp_path, capsys, "--data", path, *fix.split())
    assert rc == 0, err
    got = {f"--{k}-size": payload["data"][k] for k in ("train", "validation", "test", "calibration")}
    for flag, value in zip(fix.split()[::2], fix.split()[1::2]):
        assert got[flag] == int(value)
    assert got["--calibration-size"] <= got["--train-size"]


def test_size_error_is_an_eva_error_subclass():
    with pytest.raises(SizeError):
        fit_sizes(100, train=90, validation=10, test=10)


# the table and the JSON ---------------------------------------------------------------------

def synthetic_runs(accuracies, steps=90):
    """Runs as ``run_comparison`` stores them: ``accuracies[method][seed]``."""
    return [{"method": m, "seed": s, "lr": 1e-3, "losses": [1.0 - 0.001 * i for i in range(steps)],
             "accuracy": a, "init_seconds": 0.1, "train_seconds": 2.0}
            for m, accs in accuracies.items() for s, a in enumerate(accs)]


def test_one_seed_shows_no_spread_and_no_verdict():
    rows = report.summary_rows(synthetic_runs({"lora": [0.55], "eva": [0.56]}), ["lora", "eva"])
    text = report.format_summary(rows, test_rows=400, chance=(0.52, "majority class 'pos' of the test split"))
    assert "+-" not in text and ".." not in text and "vs lora" not in text and "noise:" not in text
    assert "test accuracy (1 seed)" in text and re.search(r"^eva +1e-03 +0\.5600$", text, re.M), text
    assert "one seed: no spread" in text
    assert rows[1]["accuracy sd"] is None and rows[1]["vs baseline"] is None
    assert report.noise_summary(rows)["verdicts"] == {"eva": None}


def test_two_seeds_show_the_range_and_the_noise_verdicts():
    accs = {"lora": [0.50, 0.60], "eva": [0.58, 0.70], "pissa": [0.62, 0.64], "olora": [0.40, 0.45]}
    rows = report.summary_rows(synthetic_runs(accs), list(accs))
    text = report.format_summary(rows, test_rows=400)
    assert "test accuracy (mean, min..max of 2 seeds)" in text and "vs lora" in text
    for method, mean, lo, hi, verdict in [("lora", 0.55, 0.5, 0.6, "baseline"), ("eva", 0.64, 0.58, 0.7, "within noise"),
                                          ("pissa", 0.63, 0.62, 0.64, "above noise"),
                                          ("olora", 0.425, 0.4, 0.45, "below noise")]:
        assert re.search(rf"^{method} +1e-03 +{mean:.4f} \({lo:.4f}\.\.{hi:.4f}\) +{verdict}$", text, re.M), text
    assert report.noise_summary(rows)["verdicts"] == {"eva": "within noise", "pissa": "above noise",
                                                      "olora": "below noise"}
    assert "400 test rows: one row = 0.0025" in text


def test_loss_columns_name_their_steps():
    rows = report.summary_rows(synthetic_runs({"lora": [0.5]}), ["lora"])
    text = report.format_summary(rows)
    assert "early loss (mean of steps 1-45)" in text and "final loss (mean of steps 71-90)" in text
    assert rows[0]["final loss"] == pytest.approx(sum(1.0 - 0.001 * i for i in range(70, 90)) / 20)
    assert report.loss_windows(3) == ((1, 1), (1, 3)) and report.steps_text((1, 1)) == "step 1"


def test_cli_prints_and_stores_the_verdicts(tmp_path, capsys, fake_training):
    rc, out, err, payload = compare_cli(tmp_path, capsys, "--data", write_csv(tmp_path / "d.csv", 40))
    assert rc == 0, err
    assert re.search(r"^eva +1e-03 +0\.7050 \(0\.7000\.\.0\.7100\) +above noise$", out, re.M), out
    assert payload["seed noise"]["verdicts"] == {"eva": "above noise"} and payload["seed noise"]["baseline"] == "lora"
    assert [r["vs baseline"] for r in payload["summary"]] == ["baseline", "above noise"]


# the figure ------------------------------------------------------------------------------

def test_figure_accuracy_axis_from_zero_with_chance_line_and_integer_steps():
    import matplotlib.pyplot as plt
    runs = synthetic_runs({"lora": [0.50, 0.52], "eva": [0.51, 0.55]}, steps=4)  # default ticks: 1.0, 1.5, ...
    fig = report.figure(runs, ["lora", "eva"], "t", chance=(0.52, "majority class 'pos' of the test split"),
                        test_rows=400)
    try:
        ax_loss, ax_acc = fig.axes
        assert ax_acc.get_ylim()[0] == 0.0 and ax_acc.get_ylim()[1] >= 1.0
        (chance,) = [ln for ln in ax_acc.get_lines() if ln.get_ydata()[0] == 0.52]
        assert "majority class 'pos'" in chance.get_label() and "0.520" in chance.get_label()
        assert any("majority class" in t.get_text() for t in ax_acc.get_legend().get_texts())
        lo, hi = ax_loss.get_xlim()
        ticks = [t for t in ax_loss.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        assert [t.get_text() for t in ax_acc.get_xticklabels()] == ["lora\nbaseline", "eva\nwithin noise"]
        assert "1 test row = 0.0025" in ax_acc.get_ylabel()
    finally:
        plt.close(fig)


def test_majority_rate():
    assert report.majority_rate([1, 0, 1, 1]) == (0.75, 1)
