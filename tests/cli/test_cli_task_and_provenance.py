"""``eva init --task``, every ``--target-modules`` name checked, provenance in the file, and a
light start (no torch before the arguments are parsed; Ctrl-C there is one line).

Every error that suggests a fix is followed here, and the fixed command runs.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import subprocess
import sys

import pytest
import torch

from eva.cli import main
from eva.result import load_eva_state_dict
from eva.cli.text_data import bundled_calibration_path, bundled_model_path, read_lines
from test_cli_errors import assert_one_error, call

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("\n".join(read_lines(bundled_calibration_path())[:12]) + "\n\n", encoding="utf-8")
    return path


def _init(model, data, out, *extra):
    return ["init", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet", "--max-steps", "2",
            *extra]


@pytest.fixture(scope="module")
def distilbert(tmp_path_factory):
    """A tiny DistilBERT folder: transformers has no causal-LM class for it."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel
    folder = tmp_path_factory.mktemp("distilbert")
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                     vocab_size=tokenizer.vocab_size)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_mistyped_target_among_good_ones_is_one_line_with_the_closest_name(tmp_path, data_file):
    out = tmp_path / "x.safetensors"
    line = assert_one_error(call(_init(bundled_model_path(), data_file, out, "--target-modules", "query,vlue")),
                            "--target-modules entry 'vlue' (closest: value", "fix or remove it",
                            "skipped silently")
    assert not out.exists() and "eva init --help" in line
    rc, stdout, _ = call(_init(bundled_model_path(), data_file, out, "--target-modules", "query,value"))  # the fix
    assert rc == 0 and any(k.endswith("attention.self.value") for k in load_eva_state_dict(str(out)))


def test_task_without_a_class_names_the_tasks_that_work_and_they_do(tmp_path, data_file, distilbert):
    out = tmp_path / "x.safetensors"
    assert_one_error(call(_init(distilbert, data_file, out, "--task", "causal-lm")),
                     "--task causal-lm: transformers has no AutoModelForCausalLM class", "model_type 'distilbert'",
                     "use --task seq-cls or --task base")
    for task, prefix in (("seq-cls", "distilbert.transformer."), ("base", "transformer.")):
        rc, stdout, _ = call(_init(distilbert, data_file, out, "--task", task))
        assert rc == 0 and f"(--task {task}: DistilBert" in stdout
        sd = load_eva_state_dict(str(out))
        # seq-cls: the head ("classifier") is left out of all-linear as PEFT's SEQ_CLS does; pre_classifier is not
        assert sd and all(k.startswith(prefix) or k == "pre_classifier" for k in sd), list(sd)
        assert "classifier" not in sd and ("pre_classifier" in sd) == (task == "seq-cls")


def test_task_auto_reads_config_architectures(tmp_path, data_file):
    rc, stdout, _ = call(_init(bundled_model_path(), data_file, tmp_path / "x.safetensors",
                               "--target-modules", "query"))
    assert rc == 0 and "(--task base: BertModel)" in stdout  # MiniLM's config names BertModel


def test_the_file_says_where_it_came_from(tmp_path, data_file):
    out = tmp_path / "x.safetensors"
    argv = _init(bundled_model_path(), data_file, out, "--target-modules", "query,key", "--rank", "4")
    assert main(argv) == 0
    sd = load_eva_state_dict(str(out))
    prov, model = sd.metadata["provenance"], sd.metadata["model"]
    assert sd.provenance == prov
    source = prov["source"]
    assert source["command"] == "eva " + " ".join(argv)
    assert source["model"] == {"path": os.path.abspath(bundled_model_path())} and source["task"] == "base"
    data = source["data"]
    assert data["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert data["lines"] == 12 and data["bytes"] == data_file.stat().st_size and data["path"] == str(data_file)
    assert (source["batch_size"], source["max_length"], source["dtype"]) == (8, 128, "float32")
    assert prov["software"]["torch"] == torch.__version__ and "eva-kernels" in prov["software"]
    assert prov["device"] == "cpu"
    when = datetime.datetime.fromisoformat(prov["date"].replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 600
    assert (model["model_class"], model["base_class"], model["model_type"], model["base_prefix"]) == \
        ("BertModel", "BertModel", "bert", "")
    assert len(model["config_sha256"]) == 64
    assert sd.metadata["settings"]["r"] == 4 and sd.metadata["settings"]["target_modules"] == ["key", "query"]
    rc, text, _ = call(["inspect", str(out)])
    head, table = text.split("\n\n", 1)
    assert rc == 0 and table.startswith("layer")
    for words in ("model     BertModel (model_type 'bert'); base BertModel at 'the root'; config sha256 "
                  + model["config_sha256"][:16],
                  f"data      {data_file}: 12 lines", "sha256 " + data["sha256"][:16], "settings  r=4 rho=2.0 tau=0.99",
                  "run       mode all_at_once, 2 batches used of 2 read", "software  eva-kernels",
                  f"device    cpu; date {prov['date']}", "command   eva init --model"):
        assert words in head, words


def test_help_explains_all_linear_and_task(capsys):
    with pytest.raises(SystemExit):
        main(["init", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "all-linear: every nn.Linear / Conv1D layer except the output layer (lm_head)" in text
    assert "--task {auto,causal-lm,seq-cls,seq2seq-lm,base}" in text and "(default: auto)" in text


def test_starting_the_command_line_loads_no_torch():
    code = "import sys, eva, eva.cli; eva.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_ctrl_c_while_starting_is_one_line(monkeypatch, capsys):
    import eva.cli as cli

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["init"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("eva: interrupted") and err.count("\n") == 1


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """A tiny T5 folder (encoder-decoder: its base class needs decoder inputs)."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration
    folder = tmp_path_factory.mktemp("t5")
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                                        vocab_size=tokenizer.vocab_size, decoder_start_token_id=0,
                                        architectures=["T5ForConditionalGeneration"])).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_encoder_decoder_calibrates_text_as_source_and_target_and_loads_for_training(tmp_path, data_file, t5):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    import eva
    out = tmp_path / "x.safetensors"
    assert_one_error(call(_init(t5, data_file, out, "--task", "base")),
                     "--task base: --model", "is an encoder-decoder model (model_type 't5')",
                     "use --task seq-cls or --task seq2seq-lm")
    rc, stdout, _ = call(_init(t5, data_file, out))  # auto: seq2seq-lm, the fix the message names
    assert rc == 0 and "(--task seq2seq-lm: T5ForConditionalGeneration)" in stdout
    sd = load_eva_state_dict(str(out))
    layers = sd.metadata["layers"]
    encoder = layers["encoder.block.0.layer.0.SelfAttention.q"]["tokens"]
    decoder = layers["decoder.block.0.layer.0.SelfAttention.q"]["tokens"]
    assert encoder == decoder > 0  # the labels are the inputs: the decoder sees every kept token too
    assert "lm_head" not in sd
    model = AutoModelForSeq2SeqLM.from_pretrained(t5)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights="eva",
                                                  task_type="SEQ_2_SEQ_LM"))
    eva.initialize_lora_eva_weights(peft_model, eva_state_dict=sd)
