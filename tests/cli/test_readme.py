"""The README's Python example runs as written (on the bundled MiniLM) and does what it says."""
from __future__ import annotations

import os
import re
import warnings


README = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "README.md")


def python_blocks(text: str):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(open(README, encoding="utf-8").read())
    example = next(b for b in blocks if "bundled_model_path" in b)
    monkeypatch.chdir(tmp_path)  # it writes out/readme_eva.safetensors
    scope = {"__name__": "readme_example"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(example, "README.md", "exec"), scope)
    assert os.path.isfile(tmp_path / "out" / "readme_eva.safetensors")
    sd, first, second = scope["eva_sd"], scope["peft_model"], scope["peft_model2"]
    assert len(sd) == 18 and all(k.endswith(("query", "key", "value")) for k in sd)  # 6 layers x q/k/v
    # the two routes use separate configs: each PEFT model's config holds its own ranks
    assert first.peft_config["default"] is not second.peft_config["default"]
    assert first.peft_config["default"].rank_pattern == {k: v for k, v in sd.ranks.items() if v != 8}
    assert "total rank" in capsys.readouterr().out


def test_cli_example_needs_no_gpu():
    text = open(README, encoding="utf-8").read()
    cli = text[text.index("## Command line"):]
    cli = cli[:cli.index("\n## ", 3)]
    for line in re.findall(r"```bash\n(.*?)```", cli, flags=re.S):
        assert "--device cuda" not in line or "GPU" in line
