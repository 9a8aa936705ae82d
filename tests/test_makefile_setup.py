"""The Makefile's set-up (tools/setup_env.py): .venv by default, PY= bypasses it, stamps skip pip
when nothing changed, a lock serialises concurrent runs. pip and the interpreter probe are replaced
by fakes here (no install runs); one test probes the real interpreter, one creates a real venv."""
import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def setup_env(tmp_path, monkeypatch):
    """tools/setup_env.py on a copy of the files it hashes, with fake pip and probe."""
    spec = importlib.util.spec_from_file_location("setup_env_under_test", os.path.join(ROOT, "tools", "setup_env.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in ("pyproject.toml", "setup.py", "requirements-dev.txt", "requirements-slow.txt",
                 "eva_kernels/_version.py"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    monkeypatch.setattr(mod, "ROOT", str(tmp_path))
    monkeypatch.setattr(mod, "LOCK", str(tmp_path / ".eva-setup.lock"))
    for var in ("EVA_SYSTEM_SITE_PACKAGES", "EVA_REQUIRE_EXT", *mod.BUILD_ENV):
        monkeypatch.delenv(var, raising=False)

    fake = {"missing": set(), "torch": True, "calls": [], "ext": True}

    def probe(python, names):
        return {"executable": python, "version": "3.x", "prefix": "/fake", "base_prefix": "/fake",
                "ext_suffix": ".fake.so", "torch": fake["torch"], "torch_version": "2.13.0" if fake["torch"] else None,
                "pip": True, "missing": sorted(n for n in names if n in fake["missing"])}

    def run(cmd, env):
        args = cmd[cmd.index("install") + 1:]
        fake["calls"].append([a for a in args if a not in mod.PIP_FLAGS])
        fake["missing"].clear()
        fake["torch"] = True
        if "-e" in args and fake["ext"]:
            (tmp_path / "eva_kernels" / "_C.fake.so").write_bytes(b"")
        return 0

    monkeypatch.setattr(mod, "probe", probe)
    monkeypatch.setattr(mod, "run", run)
    mod.fake = fake
    mod.tmp = tmp_path
    return mod


def calls_of(mod, stage="dev", keep=False):
    """The pip calls one set-up makes (PY= mode: the stamps go under build/)."""
    mod.fake["calls"].clear()
    env = mod.Env("/fake/python", str(mod.tmp / "build" / "stamps"), keep)
    if stage in ("dev", "slow"):
        mod.stage_dev(env)
    if stage == "slow":
        mod.stage_slow(env)
    mod.stage_project(env)
    return [" ".join(c) for c in mod.fake["calls"]]


def test_second_run_skips_pip(setup_env):
    mod = setup_env
    assert calls_of(mod) == ["torch==2.13.0 setuptools>=70.1 -r requirements-dev.txt",
                             "--no-deps --no-build-isolation --no-index -e ."]
    assert calls_of(mod) == []
    os.utime(mod.tmp / "requirements-dev.txt")  # a newer mtime, same content: still nothing
    assert calls_of(mod) == []


def test_what_each_change_reinstalls(setup_env, monkeypatch):
    mod = setup_env
    calls_of(mod, "slow")
    with open(mod.tmp / "csrc" / "cpu" / "cov_update_cpu.cpp", "a") as f:
        f.write("// changed\n")
    assert calls_of(mod, "slow") == ["--no-deps --no-build-isolation --no-index -e ."]
    with open(mod.tmp / "requirements-dev.txt", "a") as f:
        f.write("# changed\n")
    assert calls_of(mod, "slow") == ["torch==2.13.0 setuptools>=70.1 -r requirements-dev.txt"]
    with open(mod.tmp / "requirements-slow.txt", "a") as f:
        f.write("# changed\n")
    assert calls_of(mod, "slow") == ["-r requirements-slow.txt"]
    assert calls_of(mod, "dev") == []  # dev does not look at the slow requirements
    (mod.tmp / "pyproject.toml").write_text((mod.tmp / "pyproject.toml").read_text() + "\n")
    assert calls_of(mod, "slow") == ["--no-deps --no-build-isolation --no-index -e ."]
    monkeypatch.setenv("EVA_PORTABLE", "1")  # a build setting of setup.py
    assert calls_of(mod, "slow") == ["--no-deps --no-build-isolation --no-index -e ."]
    mod.fake["missing"].add("peft")  # uninstalled behind our back
    assert calls_of(mod, "slow") == ["torch==2.13.0 setuptools>=70.1 -r requirements-dev.txt"]
    assert calls_of(mod, "slow") == []


def test_extension_gone_or_required_rebuilds(setup_env, monkeypatch):
    mod = setup_env
    calls_of(mod)
    os.remove(mod.tmp / "eva_kernels" / "_C.fake.so")  # make clean
    assert calls_of(mod) == ["--no-deps --no-build-isolation --no-index -e ."]
    # a build that failed without EVA_REQUIRE_EXT is not retried ...
    mod.fake["ext"] = False
    os.remove(mod.tmp / "eva_kernels" / "_C.fake.so")
    (mod.tmp / "setup.py").write_text((mod.tmp / "setup.py").read_text() + "\n")
    assert calls_of(mod) == ["--no-deps --no-build-isolation --no-index -e ."]
    assert calls_of(mod) == []
    # ... until `make test` requires the extension (EVA_REQUIRE_EXT=1)
    monkeypatch.setenv("EVA_REQUIRE_EXT", "1")
    assert calls_of(mod) == ["--no-deps --no-build-isolation --no-index -e ."]


def test_system_site_packages_keep_what_is_there(setup_env):
    mod = setup_env
    mod.fake["missing"].update({"hypothesis", "torch"})  # torch imports but has no metadata: kept
    pinned = next(r for r in mod.requirements("requirements-dev.txt") if mod.dist_name(r) == "hypothesis")
    assert calls_of(mod, keep=True) == [pinned, "--no-deps --no-build-isolation --no-index -e ."]
    assert calls_of(mod, keep=True) == []
    # a different key from the isolated mode's, and nothing at all to install when all is there
    mod.fake["missing"].clear()
    (mod.tmp / "requirements-dev.txt").write_text((mod.tmp / "requirements-dev.txt").read_text() + "# x\n")
    assert calls_of(mod, keep=True) == []
    # no torch at all: the pinned one
    mod.fake["torch"] = False
    mod.fake["missing"].add("torch")
    (mod.tmp / "requirements-dev.txt").write_text((mod.tmp / "requirements-dev.txt").read_text() + "# y\n")
    assert calls_of(mod, keep=True)[0] == "torch==2.13.0"


def test_project_alone_needs_torch(setup_env):
    mod = setup_env
    mod.fake["torch"] = False
    with pytest.raises(SystemExit):
        calls_of(mod, "project")
    mod.fake["torch"] = True
    assert calls_of(mod, "project") == ["--no-deps --no-build-isolation --no-index -e ."]


def test_concurrent_run_waits_for_the_lock(setup_env, capsys):
    mod = setup_env
    mod.main(["dev"])  # PY= mode over the running interpreter (fake probe): installs, stamps
    capsys.readouterr()
    mod.fake["calls"].clear()
    with open(mod.LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=mod.main, args=(["dev"],))
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive()  # waiting on the lock
        fcntl.flock(held, fcntl.LOCK_UN)
        worker.join(30)
    out = capsys.readouterr().out
    assert "waiting for another set-up" in out and "up to date (dev), no pip run" in out
    assert mod.fake["calls"] == []


def test_probe_reports_the_interpreter():
    spec = importlib.util.spec_from_file_location("setup_env_probe", os.path.join(ROOT, "tools", "setup_env.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    info = mod.probe(sys.executable, ["pytest", "surely-not-an-installed-distribution"])
    assert info["missing"] == ["surely-not-an-installed-distribution"]
    assert info["torch"] is True and info["torch_version"]
    assert os.path.samefile(info["executable"], sys.executable)


def test_system_site_venv_sees_this_interpreters_packages(tmp_path):
    """EVA_SYSTEM_SITE_PACKAGES=1: the venv (no pip of its own) imports what the creating Python
    has, also when that Python is itself a venv (as under `make test`)."""
    spec = importlib.util.spec_from_file_location("setup_env_venv", os.path.join(ROOT, "tools", "setup_env.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    venv = str(tmp_path / "v")
    mod.make_venv(venv, True)
    py = os.path.join(venv, "bin", "python")
    out = subprocess.run([py, "-c", "import sys, pytest, pip; print(sys.prefix)"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert os.path.samefile(out.stdout.strip(), venv)
    assert "include-system-site-packages = true" in open(os.path.join(venv, "pyvenv.cfg")).read()
    marker = os.path.join(venv, ".eva-venv-complete")
    before = os.stat(marker).st_mtime_ns
    mod.make_venv(venv, None)  # unset: the existing venv is kept as it is
    assert os.stat(marker).st_mtime_ns == before


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_uses_venv_unless_py_given():
    env = {k: v for k, v in os.environ.items() if k not in ("PY", "BASE_PY", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}

    def dry(*args):
        out = subprocess.run(["make", "-n", "-C", ROOT, *args], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "python3 tools/setup_env.py --venv .venv dev" in dry("demo")
    assert ".venv/bin/python -m eva.cli demo" in dry("demo")
    assert "tools/setup_env.py --venv .venv slow" in dry("test-slow")
    assert "tools/setup_env.py --venv .venv project" in dry("gpu-check")
    bypass = dry("demo", "PY=/opt/my/python")
    assert "/opt/my/python tools/setup_env.py dev" in bypass and ".venv" not in bypass
