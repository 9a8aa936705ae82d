"""``eva compare`` and :mod:`eva.compare`: bad CSVs fail before any model loads, with the column,
the count and the fix named; splits are disjoint; a tiny end-to-end run writes the JSON and PNG."""
from __future__ import annotations

import csv
import json

import pytest

from eva.cli import main
from eva.compare.data import calibration_rows, read_labelled_csv, split

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def reviews(n):
    good = ["a wonderful film, moving and funny", "great acting and a lovely story", "i loved every minute"]
    bad = ["a dull, boring mess", "terrible acting and a silly plot", "i want my two hours back"]
    return [(f"{(good if i % 2 else bad)[i % 3]} ({i})", str(i % 2)) for i in range(n)]


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load a tokenizer or a model fails the test: checks come first."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("a model or tokenizer was loaded before the data was checked")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", refuse)


def run_cli(args, capsys):
    rc = main(["compare", *args])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("rows,header,extra,match", [
    (reviews(40), ("review", "label"), [], r"no column 'text'; its columns are \['review', 'label'\]"),
    ([("nice", "0.5"), ("bad", "1.5")] * 20, ("text", "label"), [], r"holds '0.5': labels must be integers or strings"),
    ([("nice", "pos")] * 40, ("text", "label"), [], r"column 'label' has a single class \('pos' in all 40 rows\)"),
    (reviews(3), ("text", "label"), [], r"3 rows, but the train / validation / test splits need at least 4"),
    ([("", "1"), ("fine", "0")] * 20, ("text", "label"), [], r"line 2 has an empty 'text'"),
    (reviews(40), ("text", "label"), ["--methods", "lora,magic"], r"--methods: unknown \['magic'\]"),
])
def test_bad_csv_fails_before_any_model_loads(tmp_path, capsys, no_model_load, rows, header, extra, match):
    path = write_csv(tmp_path / "d.csv", rows, header)
    rc, out = run_cli(["--data", path, *extra], capsys)
    assert rc == 2
    assert out.err.startswith("eva: error: ")
    import re
    assert re.search(match, out.err), out.err


def test_missing_file(tmp_path, capsys, no_model_load):
    rc, out = run_cli(["--data", str(tmp_path / "none.csv")], capsys)
    assert rc == 2 and "no such file" in out.err


def test_labels_integers_or_class_names(tmp_path):
    ints = read_labelled_csv(write_csv(tmp_path / "i.csv", [("a", "10"), ("b", "2"), ("c", "10")]), "text", "label")
    assert ints.classes == ["2", "10"] and ints.labels == [1, 0, 1]  # numeric order, not string order
    names = read_labelled_csv(write_csv(tmp_path / "s.csv", [("a", "pos"), ("b", "neg")]), "text", "label")
    assert names.classes == ["neg", "pos"] and names.labels == [1, 0]


def test_splits_are_disjoint_and_calibration_comes_from_training_rows(tmp_path):
    data = read_labelled_csv(write_csv(tmp_path / "d.csv", reviews(100)), "text", "label")
    parts = split(data, 60, 15, 20, seed=0)
    sets = [set(p.texts) for p in (parts.train, parts.validation, parts.test)]
    assert [len(s) for s in sets] == [60, 15, 20]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    calib = calibration_rows(parts.train, 10, seed=0)
    assert set(calib.texts) <= sets[0] and len(calib) == 10
    assert split(data, 60, 15, 20, seed=0).test.texts == parts.test.texts  # fixed by the seed


@pytest.mark.filterwarnings("ignore")
def test_tiny_comparison_end_to_end(tmp_path, capsys):
    path = write_csv(tmp_path / "d.csv", reviews(48))
    out_json, out_png = tmp_path / "c.json", tmp_path / "c.png"
    rc, out = run_cli(["--data", path, "--methods", "lora,eva", "--steps", "3", "--seeds", "2", "--lr", "1e-3",
                       "--batch-size", "4", "--max-length", "16", "--train-size", "24", "--validation-size", "8",
                       "--test-size", "12", "--calibration-size", "8", "--rank", "2", "--out-json", str(out_json),
                       "--out-png", str(out_png)], capsys)
    assert rc == 0, out.err
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    payload = json.loads(out_json.read_text())
    assert [r["method"] for r in payload["summary"]] == ["lora", "eva"]
    assert len(payload["runs"]) == 4 and all(len(r["losses"]) == 3 for r in payload["runs"])
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in payload["runs"])
    assert payload["data"]["train"] == 24 and payload["data"]["calibration"] == 8
    assert set(payload["setting"]["lr"].values()) == {1e-3}
    assert "lora" in out.out and "init share" in out.out


@pytest.mark.parametrize("per_method", [False, True], ids=["one-rate", "per-method"])
def test_learning_rate_rule(tmp_path, monkeypatch, per_method):
    """One rate for all = the default init's best validation accuracy (ties: the smaller rate);
    per method = each method's own best. Fine-tuning is replaced by a table of accuracies."""
    import eva.compare as compare
    from eva.cli.text_data import bundled_model_path
    from eva.compare.training import RunResult
    table = {("lora", 3e-4): 0.6, ("lora", 1e-3): 0.7, ("lora", 3e-3): 0.7,
             ("eva", 3e-4): 0.8, ("eva", 1e-3): 0.5, ("eva", 3e-3): 0.4}
    calls = []

    def fake_finetune(model_path, tok, train, evaluate, calibration, *, method, seed, lr, steps, **common):
        calls.append((method, lr, steps, len(evaluate)))
        return RunResult(method, seed, lr, losses=[0.7] * steps, accuracy=table[(method, lr)],
                         init_seconds=0.1, train_seconds=1.0)
    monkeypatch.setattr(compare, "finetune", fake_finetune)
    path = write_csv(tmp_path / "d.csv", reviews(48))
    payload = compare.run_comparison(
        model_path=bundled_model_path(), data_path=path, text_column="text", label_column="label",
        methods=["lora", "eva"], steps=6, seeds=2, r=2, targets=["query"], batch_size=4, max_length=16,
        train_size=24, validation_size=8, test_size=12, calibration_size=8, lr=None, lr_steps=3,
        lr_per_method=per_method, out_json=str(tmp_path / "c.json"), out_png=str(tmp_path / "c.png"),
        log=lambda *_: None)
    searched = [(m, lr) for m, lr, steps, n in calls if steps == 3]
    assert all(n == 8 for m, lr, steps, n in calls if steps == 3)  # the search sees validation rows only
    assert all(n == 12 for m, lr, steps, n in calls if steps == 6)  # the runs are scored on test rows
    if per_method:
        assert sorted(searched) == sorted(table) and payload["setting"]["lr"] == {"lora": 1e-3, "eva": 3e-4}
    else:
        assert {m for m, _ in searched} == {"lora"} and payload["setting"]["lr"] == {"lora": 1e-3, "eva": 1e-3}
    assert [(r["method"], r["lr"]) for r in payload["summary"]] == list(payload["setting"]["lr"].items())
