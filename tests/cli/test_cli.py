"""The ``eva`` command line (``eva.cli.main(argv)`` -> exit code) and the rank plot helpers."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import eva
from eva.cli import main
from eva.cli.plot import plot_ranks, rank_grid
from eva.result import EvaStateDict, load_eva_state_dict
from eva.cli.text_data import bundled_calibration_path, bundled_model_path, read_lines
from eva_kernels import subspace_overlap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QV_LAYERS = [f"encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "value")]

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning")




def call(argv):
    """Run ``main(argv)`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def rank_table(text: str) -> dict:
    """{layer: rank} from the table printed by ``EvaStateDict.summary()``."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("layer") and "rank" in ln and "evr[0]" in ln)
    rows = {}
    for ln in lines[start + 1:]:
        if ln.startswith("total rank"):
            break
        name, rank = ln.split()[:2]
        rows[name] = int(rank)
    return rows


def summary_lines(text: str) -> list:
    """The summary table: from its header through the ``total rank`` line."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("layer") and "evr[0]" in ln)
    end = next(i for i, ln in enumerate(lines) if ln.startswith("total rank"))
    return lines[start:end + 1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    lines = read_lines(bundled_calibration_path())[:12]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # trailing blank lines are skipped
    return path


@pytest.fixture(scope="module")
def init_run(tmp_path_factory, data_file):
    tmp = tmp_path_factory.mktemp("init")
    out, png = tmp / "x.safetensors", tmp / "plots" / "x.png"  # the plot folder is created
    rc, stdout, stderr = call([
        "init", "--model", bundled_model_path(), "--data", str(data_file), "--rank", "2", "--batch-size", "4",
        "--max-length", "24", "--max-steps", "3", "--target-modules", "query,value", "--out", str(out),
        "--plot", str(png), "--quiet"])
    return dict(rc=rc, out=stdout, err=stderr, file=out, png=png)


# ------------------------------------------------------------------------------ eva init ---
def test_init_succeeds_and_writes_files(init_run):
    assert init_run["rc"] == 0, init_run["err"]
    assert init_run["file"].is_file()
    assert init_run["png"].read_bytes()[:8] == PNG_MAGIC
    assert f"wrote {init_run['file']}" in init_run["out"]
    assert f"wrote {init_run['png']}" in init_run["out"]
    assert "eva: error" not in init_run["err"]


def test_init_prints_rank_table(init_run):
    table = rank_table(init_run["out"])
    assert list(table) == QV_LAYERS
    assert sum(table.values()) == 2 * len(QV_LAYERS)  # budget r x layers
    assert all(0 <= r <= 4 for r in table.values())     # at most r * rho
    out = init_run["out"]
    assert f"total rank {2 * len(QV_LAYERS)} (budget {2 * len(QV_LAYERS)}), 3 batches" in out
    assert "12 lines, batch 4 x <= 24 tokens" in out
    assert "3 batches, stop: max_steps" in out
    # query and value of one layer share their input: same rank
    for i in range(6):
        assert table[f"encoder.layer.{i}.attention.self.query"] == table[f"encoder.layer.{i}.attention.self.value"]


def test_inspect_prints_the_same_layers(init_run):
    rc, out, err = call(["inspect", str(init_run["file"])])
    assert rc == 0, err
    assert rank_table(out) == rank_table(init_run["out"])
    assert summary_lines(out) == summary_lines(init_run["out"])  # rebuilt exactly from the file


def test_saved_file_round_trip(init_run, tmp_path):
    sd = load_eva_state_dict(str(init_run["file"]))
    assert isinstance(sd, EvaStateDict)
    assert list(sd) == QV_LAYERS == sd.metadata["order"]
    for key in ("layers", "run", "settings"):
        assert key in sd.metadata
    assert sd.metadata["run"]["steps"] == 3 and sd.metadata["run"]["stop_reason"] == "max_steps"
    s = sd.metadata["settings"]
    assert (s["r"], s["rho"], s["tau"], s["max_steps"]) == (2, 2.0, 0.99, 3)
    assert sorted(s["target_modules"]) == ["query", "value"]
    for name, w in sd.items():
        info = sd.metadata["layers"][name]
        assert w.dtype == torch.float32 and w.shape == (info["rank"], 384) and info["in_features"] == 384
        assert info["tokens"] > 0 and info["steps"] == 3
    again = tmp_path / "again.safetensors"
    assert sd.save(str(again)) == str(again)
    sd2 = load_eva_state_dict(str(again))
    assert list(sd2) == list(sd) and sd2.metadata == sd.metadata
    for name in sd:
        assert torch.equal(sd2[name], sd[name])


def test_round_trip_of_a_fresh_result(tiny_gpt2, tmp_path):
    """In-memory result -> file -> result: tensors bit-equal, metadata equal (JSON types), order kept."""
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig

    from helpers import random_token_batches
    cfg = LoraConfig(r=3, target_modules=["c_fc", "c_attn"], init_lora_weights="eva",
                     eva_config=EvaConfig(rho=2.0))
    cfg.rank_pattern = {"h.1.mlp.c_fc": 1}
    sd = eva.get_eva_state_dict(tiny_gpt2, random_token_batches(101, 3), cfg, show_progress_bar=False)
    sd["h.0.mlp.c_fc"] = sd["h.0.mlp.c_fc"][:0]  # a rank-0 layer is stored as an empty (0, d) tensor
    path = tmp_path / "sub" / "sd.safetensors"
    sd.save(str(path))
    back = load_eva_state_dict(str(path))
    assert list(back) == list(sd)
    expected = json.loads(json.dumps(sd.metadata, default=str))
    expected["layers"]["h.0.mlp.c_fc"]["rank"] = 0  # the file's metadata follows the edited tensor
    assert back.metadata == expected
    assert back.metadata["settings"]["rank_pattern"] == {"h.1.mlp.c_fc": 1}
    for name in sd:
        assert back[name].shape == sd[name].shape
        assert torch.equal(back[name], sd[name])
    assert back.ranks["h.0.mlp.c_fc"] == 0


def test_bad_data_path(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    rc = main(["init", "--model", bundled_model_path(), "--data", str(missing), "--out",
               str(tmp_path / "x.safetensors"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "eva: error" in err and "--data" in err and str(missing) in err
    assert not (tmp_path / "x.safetensors").exists()


def test_data_without_text(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n\n", encoding="utf-8")
    rc = main(["init", "--model", bundled_model_path(), "--data", str(empty), "--quiet"])
    assert rc == 2
    assert "eva: error: --data" in capsys.readouterr().err


def test_unmatched_target_modules_exit_2(tmp_path, data_file, capsys):
    """Caught before loading (on a weightless copy of the model), naming the layers there are."""
    rc = main(["init", "--model", bundled_model_path(), "--data", str(data_file), "--target-modules", "nothing",
               "--max-length", "16", "--max-steps", "1", "--out", str(tmp_path / "x.safetensors"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("eva: error: --target-modules 'nothing' matches no linear layer") and err.count("\n") == 1
    assert "attention.self.query" in err and "all-linear" in err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["init", "--data", "x.txt"])  # --model missing
    assert info.value.code == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])  # a command is required
    assert info.value.code == 2


def test_bad_model_path(tmp_path, data_file, capsys):
    rc = main(["init", "--model", str(tmp_path / "no-model"), "--data", str(data_file), "--quiet"])
    assert rc == 2
    assert "eva: error" in capsys.readouterr().err


def test_inspect_missing_file(tmp_path, capsys):
    rc = main(["inspect", str(tmp_path / "missing.safetensors")])
    assert rc == 2
    assert "eva: error" in capsys.readouterr().err


def test_bad_backend_name(tmp_path, data_file, capsys):
    """Rejected while parsing (argparse: exit 2, one line naming the choices)."""
    with pytest.raises(SystemExit) as info:
        main(["init", "--model", bundled_model_path(), "--data", str(data_file), "--backend", "bogus",
              "--target-modules", "query", "--max-length", "16", "--max-steps", "1",
              "--out", str(tmp_path / "x.safetensors"), "--quiet"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("eva init: error: argument --backend: 'bogus' is not a backend") and "torch" in err


def test_help_subprocess():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "eva.cli", "--help"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: eva")
    for cmd in ("init", "demo", "inspect"):
        assert cmd in proc.stdout


# ------------------------------------------------------------------------------ eva demo ---
def test_demo(tmp_path):
    out, png = tmp_path / "demo.safetensors", tmp_path / "demo.png"
    rc, stdout, err = call(["demo", "--max-steps", "2", "--max-length", "24", "--batch-size", "4",
                            "--out", str(out), "--plot", str(png), "--quiet"])
    assert rc == 0, err
    assert f"model {bundled_model_path()}" in stdout
    assert f"data {bundled_calibration_path()}" in stdout
    assert "2 batches, stop: max_steps" in stdout
    table = rank_table(stdout)
    # every encoder linear layer (6 per block); pooler.dense (unused by sentence embeddings) is left out
    assert len(table) == 6 * 6 and "pooler.dense" not in table
    assert all(name.startswith("encoder.layer.") for name in table)
    assert sum(table.values()) == 8 * len(table)
    assert out.is_file() and png.read_bytes()[:8] == PNG_MAGIC
    assert list(load_eva_state_dict(str(out))) == list(table)


# ------------------------------------------------------------------------------ rank_grid --
def test_rank_grid_rows_and_columns():
    ranks = {
        "encoder.layer.0.attention.self.query": 4,
        "encoder.layer.0.attention.self.value": 2,
        "encoder.layer.1.attention.self.query": 1,
        "encoder.layer.10.attention.self.query": 7,
        "encoder.layer.2.attention.self.value": 0,
        "pooler.dense": 3,
    }
    kinds, layers, grid = rank_grid(ranks)
    assert kinds == ["attention.self.query", "attention.self.value", "pooler.dense"]  # first-seen order
    assert layers == ["0", "1", "2", "10", "-"]  # numeric order, "-" (no layer index) last
    nan = float("nan")
    expected = [[4, 1, nan, 7, nan], [2, nan, 0, nan, nan], [nan, nan, nan, nan, 3]]
    for row, exp in zip(grid, expected):
        assert len(row) == len(exp)
        for got, want in zip(row, exp):
            assert (math.isnan(got) and math.isnan(want)) or got == want
            assert isinstance(got, float)


def test_rank_grid_peft_names_and_other_models():
    kinds, layers, grid = rank_grid({
        "base_model.model.model.layers.0.self_attn.q_proj": 2,  # PeftModel names: prefix dropped
        "base_model.model.model.layers.1.self_attn.q_proj": 5,
        "base_model.model.model.layers.1.mlp.down_proj": 1,
        "h.0.attn.c_attn": 6,  # GPT-2 style
        "lm_head": 3,          # no dot, no index
    })
    assert kinds == ["self_attn.q_proj", "mlp.down_proj", "attn.c_attn", "lm_head"]
    assert layers == ["0", "1", "-"]
    assert grid[0][:2] == [2.0, 5.0] and grid[1][1] == 1.0 and grid[2][0] == 6.0 and grid[3][2] == 3.0
    assert math.isnan(grid[1][0]) and math.isnan(grid[3][0])


def test_rank_grid_empty():
    assert rank_grid({}) == ([], [], [])


def test_rank_grid_keeps_encoder_and_decoder_apart():
    kinds, layers, grid = rank_grid({
        "model.encoder.layers.0.self_attn.q_proj": 1,
        "model.decoder.layers.0.self_attn.q_proj": 5,
    })
    values = sorted(v for row in grid for v in row if not math.isnan(v))
    assert values == [1.0, 5.0]


def test_plot_ranks_writes_png(tmp_path):
    ranks = {f"encoder.layer.{i}.attention.self.{m}": (i + j) % 5 for i in range(3)
             for j, m in enumerate(("query", "value"))}
    ranks["pooler.dense"] = 0
    path = tmp_path / "r.png"
    assert plot_ranks(ranks, str(path), title="t") == str(path)
    assert path.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------- --memory-budget ---
def test_init_with_a_memory_budget_runs_layer_sequentially(tmp_path, data_file, init_run):
    """MiniLM's query/value statistics (384 x 384 fp32 per layer) one encoder layer at a time:
    the same ranks and components as the unbounded run on the same batches (each polished to
    ``final_tol``; the unbounded run screens its polish, so they agree to that tolerance)."""
    out = tmp_path / "budget.safetensors"
    rc, stdout, stderr = call([
        "init", "--model", bundled_model_path(), "--data", str(data_file), "--rank", "2", "--batch-size", "4",
        "--max-length", "24", "--max-steps", "3", "--target-modules", "query,value", "--out", str(out),
        "--memory-budget", "1MB", "--offload-device", "cpu", "--quiet"])
    assert rc == 0, stderr
    assert "layer-sequential within memory_budget 1 MB: 6 windows of blocks" in stdout
    sd, ref = load_eva_state_dict(str(out)), load_eva_state_dict(str(init_run["file"]))
    assert sd.metadata["run"]["mode"] == "layer_sequential" and len(sd.metadata["run"]["windows"]) == 6
    assert sd.metadata["run"]["peak_statistics_bytes"] <= 10**6
    assert sd.ranks == ref.ranks
    for name in ref:
        assert float(subspace_overlap(sd[name].double(), ref[name].double())) >= 0.99999, name
        torch.testing.assert_close(sd[name], ref[name], rtol=1e-3, atol=1e-4)


def test_memory_budget_that_is_not_a_size_exits_2(data_file, capsys):
    with pytest.raises(SystemExit) as info:
        main(["init", "--model", bundled_model_path(), "--data", str(data_file), "--memory-budget", "lots"])
    assert info.value.code == 2
    assert "--memory-budget must be a positive number of bytes" in capsys.readouterr().err
