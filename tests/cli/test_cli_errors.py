"""``eva`` user mistakes: one line on stderr, exit code 2, caught before the model loads.

Each mistake must give exactly one stderr line starting with ``eva: error:`` (or ``eva init:
error:`` when argparse rejects the syntax), naming the argument and the problem, with nothing on
stdout, nothing written to ``--out`` and -- for ``init`` -- neither tokenizer nor weights loaded
(``no_loading`` makes any such load fail the test).
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers

import eva
from eva.cli import DEMO_TARGETS, build_parser, main
from eva.result import EvaStateDict
from eva.cli.text_data import bundled_calibration_path, bundled_model_path, read_lines

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning")

MODEL = bundled_model_path()


def call(argv):
    """``main(argv)`` in-process: (exit code, stdout, stderr); argparse's SystemExit -> its code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def assert_one_error(result, *words, prefix="eva: error: "):
    """Exit 2, empty stdout, exactly one stderr line starting with ``prefix`` holding ``words``."""
    rc, out, err = result
    assert rc == 2, (rc, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith(prefix), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the tokenizer or the model weights are loaded."""
    def refuse(*args, **kwargs):
        raise AssertionError("loaded before the inputs were checked")
    for auto in (transformers.AutoModel, transformers.AutoModelForCausalLM,
                 transformers.AutoModelForSequenceClassification, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("\n".join(read_lines(bundled_calibration_path())[:8]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def init(tmp_path, data_file):
    """argv builder for ``eva init`` on the bundled model: ``init(*extra, data=..., model=...)``."""
    def argv(*extra, data=None, model=None, out=None):
        return ["init", "--model", str(model or MODEL), "--data", str(data or data_file),
                "--out", str(out or tmp_path / "x.safetensors"), "--quiet", *extra]
    return argv


def nothing_written(tmp_path):
    return not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------ output paths ---
def test_out_is_a_directory(tmp_path, init, no_loading):
    folder = tmp_path / "outdir"
    folder.mkdir()
    assert_one_error(call(init(out=folder)), "--out", str(folder), "is a directory", "file name")
    assert os.listdir(folder) == []


def test_out_under_an_unwritable_location(tmp_path, init, no_loading):
    target = "/proc/eva-test/x.safetensors"  # root can write anywhere chmod allows; /proc refuses everyone
    assert_one_error(call(init(out=target)), f"--out {target!r}", "cannot create files")


def test_plot_with_an_unsupported_format(tmp_path, init, no_loading):
    line = assert_one_error(call(init("--plot", str(tmp_path / "x.weird"))), "--plot", "'.weird'", ".png")
    assert "plot path" not in line  # named by its option
    assert nothing_written(tmp_path) and not (tmp_path / "x.weird").exists()


def test_plot_same_file_as_out(tmp_path, init, no_loading):
    same = tmp_path / "x.png"
    assert_one_error(call(init("--plot", str(same), out=same)), "--plot and --out are the same file")


def test_existing_out_survives_a_plot_mistake(tmp_path, init, no_loading):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"previous result")
    assert_one_error(call(init("--plot", str(tmp_path / "ranks.weird"))), "--plot")
    assert out.read_bytes() == b"previous result"


# -------------------------------------------------------------------------- data file ---
@pytest.mark.parametrize("content, words", [
    (None, ["no such file"]),
    ("dir", ["is a directory"]),
    (b"\n  \n\t\n", ["no non-empty line"]),
    (b"first line\ncaf\xe9 au lait\n", ["not UTF-8", "byte 0xe9 at offset 14 (line 2)", "iconv -f latin1 -t utf-8"]),
    (b"\xff\xfeh\x00i\x00", ["not UTF-8", "offset 0", "iconv -f utf-16 -t utf-8"]),
], ids=["missing", "directory", "blank", "latin1", "utf16"])
def test_bad_data_file(tmp_path, init, no_loading, content, words):
    data = tmp_path / "calib.txt"
    if content == "dir":
        data.mkdir()
    elif content is not None:
        data.write_bytes(content)
    assert_one_error(call(init(data=data)), f"--data {str(data)!r}", *words)
    assert nothing_written(tmp_path)


def test_read_lines_accepts_bom_and_any_line_end(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n\x0cfour\n\n")
    assert read_lines(str(path)) == ["one", "two", "three", "four"]


# ------------------------------------------------------------------------ model folder ---
def test_model_folder_missing(tmp_path, init, no_loading):
    line = assert_one_error(call(init(model=tmp_path / "no-model")), "--model", "no such folder", "config.json")
    assert "repo" not in line.split("(")[0].lower()  # not Hugging Face's repo-id message


def test_model_is_a_file(tmp_path, init, no_loading):
    assert_one_error(call(init(model=os.path.join(MODEL, "config.json"))), "--model", "is a file, not a folder",
                     repr(MODEL))


def test_gguf_file_that_is_not_gguf(tmp_path, init, no_loading):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    assert_one_error(call(init(model=fake)), "--model", "not a GGUF file", ".gguf")


def test_gguf_file_without_the_gguf_package(tmp_path, init, no_loading, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    assert_one_error(call(init(model=fake)), "--model", "gguf package", "pip install gguf")


def test_gguf_file_with_unreadable_metadata(tmp_path, init, no_loading):
    pytest.importorskip("gguf")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))  # the magic, then nothing transformers can read
    assert_one_error(call(init(model=fake)), "--model", "GGUF file's metadata cannot be read")


def test_model_folder_without_config(tmp_path, init, no_loading):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "notes.txt").write_text("hi")
    assert_one_error(call(init(model=folder)), "--model", "has no config.json", "save_pretrained")


def test_model_folder_without_weights(tmp_path, init, no_loading):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(os.path.join(MODEL, "config.json"), folder)
    assert_one_error(call(init(model=folder)), "--model", "has no weights file", "model.safetensors")


@pytest.mark.parametrize("text, words", [
    ('{"hidden_size": 4', ["config.json cannot be read"]),
    ('{"hidden_size": 4}', ["config.json cannot be read", "model_type"]),
], ids=["not-json", "no-model-type"])
def test_model_config_unreadable(tmp_path, init, no_loading, text, words):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    (folder / "model.safetensors").write_bytes(b"")
    assert_one_error(call(init(model=folder)), "--model", *words)


def test_max_length_beyond_the_model_positions(tmp_path, init, no_loading):
    assert_one_error(call(init("--max-length", "513")), "--max-length 513", "512 positions",
                     "max_position_embeddings", "--max-length 512 or less")


def test_missing_tokenizer_is_one_line(tmp_path, init):
    """Past the checks (config and weights there), a tokenizer that cannot load is still one line."""
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(MODEL, name), folder / name)
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizer"}')
    assert_one_error(call(init(model=folder)), "--model", "tokenizer")
    assert nothing_written(tmp_path)


# ------------------------------------------------------------------------------ device ---
def test_device_cuda_without_cuda(tmp_path, init, no_loading, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_one_error(call(init("--device", "cuda")), "--device 'cuda'", "not available", "--device cpu")


@pytest.mark.parametrize("name, words", [
    ("gpu", ["--device 'gpu'", "not a device", "cpu"]),
    ("meta", ["--device 'meta'", "holds no data"]),
])
def test_device_not_usable(tmp_path, init, no_loading, name, words):
    assert_one_error(call(init("--device", name)), *words)


# ---------------------------------------------------------------------- numbers, syntax ---
@pytest.mark.parametrize("option, value, words", [
    ("--rho", "nan", ["`rho` must be >= 1.0"]),
    ("--rho", "inf", ["`rho` must be >= 1.0"]),
    ("--rho", "0.5", ["`rho` must be >= 1.0"]),
    ("--tau", "nan", ["`tau` must be between 0.0 and 1.0"]),
    ("--tau", "-inf", ["`tau` must be between 0.0 and 1.0"]),
    ("--tau", "1.5", ["`tau` must be between 0.0 and 1.0"]),
    ("--rank", "0", ["must be >= 1"]),
    ("--batch-size", "0", ["must be >= 1"]),
    ("--max-length", "1", ["must be >= 2"]),
    ("--max-steps", "0", ["must be >= 1"]),
    ("--rank", "two", ["whole number"]),
    ("--target-modules", ",", ["names no module", "all-linear"]),
    ("--backend", "bogus", ["'bogus' is not a backend", "auto"]),
])
def test_bad_numbers_and_names(tmp_path, init, no_loading, option, value, words):
    assert_one_error(call(init(f"{option}={value}")), f"argument {option}:", *words, prefix="eva init: error: ")
    assert nothing_written(tmp_path)


def test_argparse_errors_are_one_line(capsys):
    assert_one_error(call(["init", "--data", "x.txt"]), "--model", prefix="eva init: error: ")
    assert_one_error(call([]), "init", prefix="eva: error: ")


def test_unknown_eva_backend_variable(tmp_path, init, no_loading, monkeypatch):
    monkeypatch.setenv("EVA_BACKEND", "bogus")
    assert_one_error(call(init()), "EVA_BACKEND='bogus'", "unset EVA_BACKEND")


def test_unmatched_targets_before_loading(tmp_path, init, no_loading):
    assert_one_error(call(init("--target-modules", "q_proj,v_proj")), "--target-modules 'q_proj,v_proj'",
                     "matches no linear layer", "attention.self.query")


def test_help_states_defaults_and_checks(capsys):
    with pytest.raises(SystemExit) as info:
        main(["init", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("(default: 8)", "(default: 2.0)", "(default: 0.99)", "(default: 128)", "(default: all-linear)",
                  "(default: eva_state_dict.safetensors)", "before the model is loaded", "--out can be created",
                  "is UTF-8 text", "fits the model's positions", "EVA_BACKEND"):
        assert words in text, words


def test_subprocess_mistake_is_exactly_one_stderr_line(tmp_path):
    """The real command, not just main(): no warning or log line around the error."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "eva.cli", "init", "--model", str(tmp_path / "nowhere"),
                           "--data", bundled_calibration_path(), "--out", str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("eva: error: --model") and "no such folder" in proc.stderr


# -------------------------------------------------------------- failures during the run ---
def test_engine_failure_is_one_line_and_keeps_the_old_file(tmp_path, init, monkeypatch):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"previous result")

    def broken(*args, **kwargs):
        raise eva.EvaError("first line\nsecond line")
    monkeypatch.setattr(eva, "get_eva_state_dict", broken)
    result = call(init("--target-modules", "query", "--max-steps", "1"))
    assert out.read_bytes() == b"previous result"
    assert_one_error(result, "first line second line")


def test_disk_full_while_saving_keeps_the_old_file(tmp_path, init, monkeypatch):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"previous result")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    rc, stdout, err = call(init("--target-modules", "query", "--max-steps", "1", "--max-length", "16"))
    assert out.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["x.safetensors"]  # no temporary file left behind
    assert rc == 2 and "total rank" in stdout  # the run itself finished
    assert err.startswith("eva: error: ") and err.count("\n") == 1 and "No space left" in err, err


# ---------------------------------------------------------------------------- inspect ---
def _eva_file(path, fmt=None):
    meta = {"layers": {"a": {"rank": 2, "in_features": 4}}, "run": {"steps": 1}}
    EvaStateDict({"a": torch.randn(2, 4)}, metadata=meta).save(str(path))
    if fmt is not None:  # rewrite with another format marker
        from safetensors.torch import save_file
        meta["format"], meta["order"] = fmt, ["a"]
        save_file({"a": torch.randn(2, 4)}, str(path), metadata={"eva_metadata": json.dumps(meta)})
    return path


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "truncated", "garbage", "foreign", "newer"])
def test_inspect_bad_file(tmp_path, kind):
    path = tmp_path / "f.safetensors"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        blob = _eva_file(path).read_bytes()
        path.write_bytes(blob[:len(blob) - 5])
    elif kind == "garbage":
        path.write_bytes(b"this is not a safetensors file at all\n" * 4)
    elif kind == "foreign":
        path = os.path.join(MODEL, "model.safetensors")  # a model's own weights
    elif kind == "newer":
        _eva_file(path, fmt="eva-kernels/99")
    assert_one_error(call(["inspect", str(path)]), repr(str(path)))


def test_inspect_good_file(tmp_path):
    path = _eva_file(tmp_path / "f.safetensors")
    rc, out, err = call(["inspect", str(path)])
    assert rc == 0 and err == ""
    head, table = out.split("\n\n", 1)
    assert "provenance: not recorded" in head and table.startswith("layer")  # a hand-built file: no provenance


# ------------------------------------------------------------------------- demo targets ---
def test_demo_targets_leave_out_the_pooler():
    """The demo's default targets match the 36 encoder linear layers of MiniLM, not pooler.dense."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    args = build_parser().parse_args(["demo"])
    assert args.target_modules == DEMO_TARGETS.split(",")
    config = LoraConfig(r=8, target_modules=args.target_modules)
    model = transformers.AutoConfig.from_pretrained(MODEL)
    with torch.device("meta"):
        skeleton = transformers.AutoModel.from_config(model)
    linear = [n for n, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    matched = [n for n in linear if check_target_module_exists(config, n)]
    assert "pooler.dense" in linear and "pooler.dense" not in matched
    assert matched == [n for n in linear if n.startswith("encoder.layer.")] and len(matched) == 36
    assert build_parser().parse_args(["init", "--model", "m", "--data", "d"]).target_modules == "all-linear"
    assert build_parser().parse_args(["init", "--model", "m", "--data", "d", "--target-modules", "query, value"]
                                ).target_modules == ["query", "value"]
