"""The README's Python example runs as written (on the bundled MiniLM) and does what it says; the README
stays short, with one set-up block of two commands, and every relative link in it and in docs/ resolves."""
from __future__ import annotations

import glob
import os
import re
import warnings
from urllib.parse import unquote


ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def read(path: str) -> str:
    return open(path, encoding="utf-8").read()


def python_blocks(text: str):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def fenced_blocks(text: str):
    """(language, body) of every fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def test_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(read(README))
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
    text = read(README)
    cli = text[text.index("## Command line"):]
    cli = cli[:cli.index("\n## ", 3)]
    for line in re.findall(r"```bash\n(.*?)```", cli, flags=re.S):
        assert "--device cuda" not in line or "GPU" in line


# a line that installs or builds: make, pip, uv, conda, a venv, a setup.py; optionally after VAR=value
_SETUP = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:make|pip3?|uv|conda|virtualenv|python3?\s+(?:-m\s+(?:pip|venv)|setup\.py))\b")


def _commands(block: str):
    """The block's lines without comments and blank lines."""
    lines = (line.split("#", 1)[0].strip() for line in block.splitlines())
    return [line for line in lines if line]


def test_readme_is_short_with_one_setup_block_of_two_commands():
    text = read(README)
    assert len(text.splitlines()) < 150, "README.md is read top down: keep it under 150 lines, move detail to docs/"
    setup = [(lang, [c for c in _commands(body) if _SETUP.match(c)]) for lang, body in fenced_blocks(text)]
    setup = [(lang, cmds) for lang, cmds in setup if cmds]
    assert len(setup) == 1, f"exactly one code block may hold set-up commands, found {setup}"
    lang, cmds = setup[0]
    assert lang == "bash" and cmds == ["make demo", "make test"], setup[0]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation except - and _ dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: str):
    text = re.sub(r"^```.*?^```", "", read(path), flags=re.S | re.M)
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M)}


def _relative_links(path: str):
    """Targets of the markdown links and images in the file, outside code blocks and code spans."""
    text = re.sub(r"^```.*?^```", "", read(path), flags=re.S | re.M)
    text = re.sub(r"(?<!\[)`[^`\n]*`(?!\])", "", text)  # code spans, except a link's text `like this`
    for target in re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:
            yield target


def test_every_relative_link_resolves():
    files = [README] + DOCS
    assert DOCS, "docs/*.md is missing"
    broken, checked = [], 0
    for path in files:
        for target in _relative_links(path):
            checked += 1
            name, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), unquote(name))) if name else path
            where = f"{os.path.relpath(path, ROOT)}: {target}"
            if not dest.startswith(ROOT + os.sep) and dest != ROOT:
                broken.append(f"{where} (outside the repository)")
            elif not os.path.exists(dest):
                broken.append(f"{where} (no such file)")
            elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
                broken.append(f"{where} (no heading with that anchor)")
    assert checked, "no relative links found: the link pattern is broken"
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_links_every_docs_page():
    text = read(README)
    missing = [os.path.relpath(p, ROOT) for p in DOCS
               if f"(docs/{os.path.basename(p)})" not in text and f"(docs/{os.path.basename(p)}#" not in text]
    assert not missing, f"README.md does not link {missing}"
