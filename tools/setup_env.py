#!/usr/bin/env python3
"""Set up the Python environment the Makefile's targets run in (standard library only).

    python3 tools/setup_env.py --venv .venv STAGE   # the project venv (make's default)
    /my/python tools/setup_env.py STAGE             # PY=/my/python make ...: that interpreter as is

STAGE:
  project  this package alone, editable (`pip install --no-deps --no-build-isolation --no-index
           -e .`), which builds the C++ extension against the torch already there (`make gpu-check`)
  dev      torch==2.13.0 (pinned: a bare `torch` may pull a multi-GB CUDA build), setuptools (the
           build needs it: --no-build-isolation) and requirements-dev.txt, then `project`
           (`make install`, which `make demo` / `make test` run first)
  slow     as dev, plus requirements-slow.txt (`make test-slow` and the real-model benches)

Pip runs only when something it depends on changed: each stage writes a stamp, a hash of what it
read (requirements-dev.txt; requirements-slow.txt; pyproject.toml, setup.py, csrc/**, the torch
version and the build's environment variables; the interpreter), kept in .venv/.eva-stamps/ (with
PY=: build/eva-stamps/, which `make clean` removes with the extension). A stamp also goes stale
when a package it installed is gone, or when the extension it built is gone (`make clean`) or
missing under EVA_REQUIRE_EXT=1. An up-to-date run costs one `python -c` (~0.1 s).

Concurrent runs: everything happens under an exclusive lock on .eva-setup.lock (fcntl.flock); a
second `make` waits, then finds the stamps fresh and installs nothing.

EVA_SYSTEM_SITE_PACKAGES=1 creates .venv with --system-site-packages (a GPU machine's
preinstalled CUDA torch, transformers, ... stay in use) and installs only what is missing there:
a torch that imports is never replaced, a package present in any version is kept, so nothing is
downloaded when everything is there. =0 asks for an isolated .venv; unset keeps the mode of an
existing .venv (isolated when creating one). Asking for the other mode recreates .venv. With PY=,
EVA_SYSTEM_SITE_PACKAGES=1 likewise installs only what that interpreter is missing.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK = os.path.join(ROOT, ".eva-setup.lock")
TORCH_PIN = "torch==2.13.0"
# pyproject.toml's [build-system] requires (setuptools>=64, wheel), which --no-build-isolation
# leaves to us: setuptools >= 70.1 has bdist_wheel itself, so this one requirement covers both.
BUILD_REQUIRES = ["setuptools>=70.1"]
# Inputs of the C++ extension's build besides the files (setup.py reads the EVA_* ones).
BUILD_ENV = ["EVA_SKIP_EXT", "EVA_NATIVE", "EVA_PORTABLE", "EVA_FORCE_CPU_EXT", "EVA_CUDA_ARCHS", "EVA_CUDA_PTX",
             "CUDA_HOME", "CC", "CXX"]
PIP_FLAGS = ["-q", "--disable-pip-version-check"]

# Run by the target interpreter: who it is and which distributions it lacks (never imports torch).
PROBE = r"""
import importlib.metadata as md, importlib.util, json, sys, sysconfig
def has(name):
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False
torch = importlib.util.find_spec("torch") is not None
print(json.dumps({
    "executable": sys.executable, "version": sys.version, "prefix": sys.prefix,
    "base_prefix": getattr(sys, "base_prefix", sys.prefix),
    "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
    "torch": torch, "torch_version": md.version("torch") if torch and has("torch") else None,
    "pip": importlib.util.find_spec("pip") is not None,
    "missing": [n for n in sys.argv[1:] if not has(n)]}))
"""


def probe(python, names):
    """What PROBE reports about `python`, asked which of the distributions `names` it lacks."""
    # cwd "/": what is installed, not what lies in the working tree (an old eva_kernels.egg-info)
    proc = subprocess.run([python, "-c", PROBE, *names], capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        fail(f"{python} does not run:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout)


def run(cmd, env):
    """Run a pip command from the repository root; its exit status."""
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def say(msg):
    print(f"[setup] {msg}", flush=True)


def fail(msg):
    print(f"[setup] error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def flag(name):
    value = os.environ.get(name, "").strip().lower()
    return None if value == "" else value in ("1", "true", "yes", "on")


def read(path):
    with open(os.path.join(ROOT, path), "rb") as f:
        return f.read()


def requirements(path):
    """The requirement lines of a requirements file (comments and pip options dropped)."""
    out = []
    for line in read(path).decode().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


def dist_name(req):
    return re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0)


def digest(*parts):
    """sha256 of JSON-able parts, where bytes (file contents) may appear at any depth."""
    def plain(x):
        if isinstance(x, bytes):
            return hashlib.sha256(x).hexdigest()
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x
    return hashlib.sha256(json.dumps(plain(list(parts)), sort_keys=True).encode()).hexdigest()


def tree(path):
    """(relative path, bytes) of every file under ROOT/path, sorted."""
    out = []
    for base, dirs, files in os.walk(os.path.join(ROOT, path)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            full = os.path.join(base, name)
            out.append((os.path.relpath(full, ROOT), read(full)))
    return out


def shown(path):
    """A path as the messages show it: relative when inside the repository."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


class Env:
    """The interpreter that the installs go into, with its stamps."""

    def __init__(self, python, stamp_dir, keep_preinstalled, venv=None):
        self.python, self.stamp_dir, self.keep, self.venv = python, stamp_dir, keep_preinstalled, venv
        self.installed = False  # whether pip ran
        self.names = sorted({dist_name(r) for r in [TORCH_PIN, *BUILD_REQUIRES, "eva-kernels",
                                                    *requirements("requirements-dev.txt"),
                                                    *requirements("requirements-slow.txt")]})
        self.refresh()

    def refresh(self):
        self.info = probe(self.python, self.names)
        self.missing = set(self.info["missing"])
        cfg = os.path.join(self.venv, "pyvenv.cfg") if self.venv else None
        self.identity = {k: self.info[k] for k in ("executable", "version", "prefix", "base_prefix")}
        self.identity["pyvenv.cfg"] = open(cfg).read() if cfg and os.path.exists(cfg) else None
        self.identity["keep_preinstalled"] = self.keep

    def lacks(self, reqs):
        """The requirements whose distribution is not installed (any version counts); with
        keep_preinstalled, a torch that imports counts as installed."""
        return [r for r in reqs if dist_name(r) in self.missing
                and not (self.keep and dist_name(r) == "torch" and self.info["torch"])]

    def pip(self, *args):
        env = dict(os.environ)
        if self.venv:  # the build finds the venv's ninja, as an activated venv would
            env["PATH"] = os.path.join(self.venv, "bin") + os.pathsep + env.get("PATH", "")
        if not self.info["pip"]:
            fail(f"pip is not importable by {self.python}")
        cmd = [self.python, "-m", "pip", "install", *PIP_FLAGS, *args]
        t0 = time.perf_counter()
        if run(cmd, env) != 0:
            fail("failed: " + " ".join(cmd))
        self.installed = True
        say(f"  pip install {' '.join(args)}: {time.perf_counter() - t0:.0f} s")
        self.refresh()

    # Stamps: {"key": hash, ...}; written after the installs succeed, removed before they start.
    def stamp(self, stage):
        try:
            with open(os.path.join(self.stamp_dir, stage + ".json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def set_stamp(self, stage, value):
        os.makedirs(self.stamp_dir, exist_ok=True)
        path = os.path.join(self.stamp_dir, stage + ".json")
        if value is None:
            if os.path.exists(path):
                os.remove(path)
            return
        with open(path + ".tmp", "w") as f:
            json.dump(value, f)
        os.replace(path + ".tmp", path)


def stage_dev(env):
    dev = requirements("requirements-dev.txt")
    key = digest("dev", TORCH_PIN, BUILD_REQUIRES, read("requirements-dev.txt"), env.identity)
    wanted = [TORCH_PIN, *BUILD_REQUIRES, *dev]
    if (env.stamp("dev") or {}).get("key") == key and not env.lacks(wanted):
        return
    env.set_stamp("dev", None)
    if env.keep:  # keep what is there (any version); never replace a torch that imports
        todo = env.lacks(wanted)
        if todo:
            say(f"{shown(env.python)}: installing what it lacks: {' '.join(todo)}")
            env.pip(*todo)
    else:  # one resolution with torch pinned, so no requirement pulls another torch
        say(f"{shown(env.python)}: installing {TORCH_PIN}, {' '.join(BUILD_REQUIRES)}, requirements-dev.txt")
        env.pip(TORCH_PIN, *BUILD_REQUIRES, "-r", "requirements-dev.txt")
    if env.lacks(wanted):
        fail(f"still missing after pip: {' '.join(env.lacks(wanted))}")
    env.set_stamp("dev", {"key": key})


def stage_slow(env):
    slow = requirements("requirements-slow.txt")
    key = digest("slow", read("requirements-slow.txt"), env.identity)
    if (env.stamp("slow") or {}).get("key") == key and not env.lacks(slow):
        return
    env.set_stamp("slow", None)
    todo = env.lacks(slow) if env.keep else ["-r", "requirements-slow.txt"]
    if todo:
        say(f"{shown(env.python)}: installing {' '.join(todo)}")
        env.pip(*todo)
    env.set_stamp("slow", {"key": key})


def stage_project(env):
    if not env.info["torch"]:
        fail(f"torch is not importable by {env.python}: run `make install` first, or set "
             "EVA_SYSTEM_SITE_PACKAGES=1 to build over a torch installed in the system's Python")
    files = [read("pyproject.toml"), read("setup.py"), read("eva_kernels/_version.py"), tree("csrc")]
    build_env = {k: os.environ.get(k) for k in BUILD_ENV}
    key = digest("project", files, env.identity, env.info["torch_version"], build_env, shutil.which("nvcc"))
    ext = os.path.join(ROOT, "eva_kernels", "_C" + (env.info["ext_suffix"] or ".so"))
    stamp = env.stamp("project") or {}
    need_ext = stamp.get("ext") or (flag("EVA_REQUIRE_EXT") and not flag("EVA_SKIP_EXT"))
    fresh = stamp.get("key") == key and "eva-kernels" not in env.missing and (os.path.exists(ext) or not need_ext)
    if fresh:
        return
    env.set_stamp("project", None)
    say(f"{shown(env.python)}: installing this package (editable) and building its C++ extension")
    env.pip("--no-deps", "--no-build-isolation", "--no-index", "-e", ".")
    env.set_stamp("project", {"key": key, "ext": os.path.exists(ext)})


def make_venv(venv, want_system_site):
    """Create (or recreate) the venv when it is missing, broken or of the other mode."""
    python = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, ".eva-venv-complete")
    cfg = os.path.join(venv, "pyvenv.cfg")
    text = open(cfg).read() if os.path.exists(cfg) else ""
    m = re.search(r"^include-system-site-packages\s*=\s*(\w+)", text, re.M)
    current = bool(m) and m.group(1).lower() == "true"
    m = re.search(r"^version(?:_info)?\s*=\s*(\d+\.\d+)", text, re.M)
    same_python = bool(m) and m.group(1) == "%d.%d" % sys.version_info[:2]
    runs = os.path.exists(marker) and subprocess.run([python, "-c", ""], capture_output=True).returncode == 0
    if runs and same_python and (want_system_site is None or want_system_site == current):
        return
    system_site = want_system_site if want_system_site is not None else current
    why = ("new" if not os.path.exists(venv) else "the old one was incomplete or broken" if not runs
           else f"the old one has Python {m.group(1) if m else '?'}" if not same_python
           else f"the old one was made {'with' if current else 'without'} system site packages")
    say(f"creating {shown(venv)} ({why}) with {sys.executable} (Python "
        f"{sys.version.split()[0]}){' --system-site-packages' if system_site else ''}")
    base = [sys.executable, "-m", "venv", "--clear"]
    if system_site:
        base.append("--system-site-packages")
        if importlib.util.find_spec("pip") is not None:
            # the system's pip (and setuptools): a bundled pip + setuptools 65 in .venv would shadow them
            base.append("--without-pip")
    proc = subprocess.run(base + [venv], capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f"`{' '.join(base)} {venv}` failed:\n{proc.stderr.strip()}\n(no ensurepip? install your "
             "distribution's python3-venv, or use PY=/path/to/python make ...)")
    if system_site and sys.prefix != getattr(sys, "base_prefix", sys.prefix):
        # python3 is itself a venv: --system-site-packages would reach its base, not the packages
        # installed in it; a .pth file adds them as site directories (their own .pth files run),
        # after .venv's own, as system site packages come.
        sites = subprocess.run([python, "-c", "import site, json; print(json.dumps(site.getsitepackages()))"],
                               capture_output=True, text=True, check=True)
        own = json.loads(sites.stdout)
        with open(os.path.join(own[0], "_eva_base_site.pth"), "w") as f:
            f.writelines(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages())
    open(marker, "w").close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["project", "dev", "slow"])
    parser.add_argument("--venv", help="create and use this virtual environment (else: this interpreter)")
    args = parser.parse_args(argv)
    system_site = flag("EVA_SYSTEM_SITE_PACKAGES")
    with open(LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another set-up to finish ({shown(LOCK)})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if args.venv:
            venv = os.path.abspath(args.venv)
            make_venv(venv, system_site)
            cfg = open(os.path.join(venv, "pyvenv.cfg")).read()
            keep = re.search(r"^include-system-site-packages\s*=\s*true", cfg, re.M | re.I) is not None
            env = Env(os.path.join(venv, "bin", "python"), os.path.join(venv, ".eva-stamps"), keep, venv)
        else:
            env = Env(sys.executable, None, bool(system_site))
            key = hashlib.sha256(f"{env.info['executable']}\0{env.info['prefix']}".encode()).hexdigest()[:12]
            env.stamp_dir = os.path.join(ROOT, "build", "eva-stamps", key)
        if args.stage in ("dev", "slow"):
            stage_dev(env)
        if args.stage == "slow":
            stage_slow(env)
        stage_project(env)
        if not env.installed:
            say(f"{shown(env.python)}: up to date ({args.stage}), no pip run")


if __name__ == "__main__":
    main()
