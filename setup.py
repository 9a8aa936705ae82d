"""Build script: package metadata lives in pyproject.toml; this file only adds the optional
C++/CUDA extension ``eva_kernels._C`` (sources in csrc/).

Install torch first, then ``pip install --no-build-isolation -e .``.

* CPU only (``torch.version.cuda is None`` or no nvcc): a CppExtension with the C++ kernel.
* torch with CUDA and nvcc present: a CUDAExtension that also compiles csrc/cuda/*.cu for
  sm_80 and sm_90a (override with EVA_CUDA_ARCHS, e.g. ``EVA_CUDA_ARCHS="80;90a;100a"``), plus
  PTX of compute_90 (``EVA_CUDA_PTX``, default ``90``; empty for none) that the driver JIT-compiles
  on newer GPUs instead of failing with "no kernel image".

Environment variables:
  EVA_SKIP_EXT=1      build no extension (pure-Python install; backend "cpp" is unavailable).
  EVA_REQUIRE_EXT=1   a failed extension build fails the install (used by ``make test``);
                      by default the failure is reported loudly and the install goes on
                      without the extension.
  EVA_NATIVE=1        add ``-march=native`` (``-mcpu=native`` on aarch64): a binary for this
                      machine only (a wheel built so may die with SIGILL elsewhere). By default
                      the build is portable: the AVX2/FMA micro-kernels are compiled in with
                      function-level target attributes and chosen at run time by CPU feature
                      detection (``EVA_CPU_ISA=generic`` forces the portable ones).
                      ``EVA_PORTABLE=1`` is accepted and means the default.

The build records the torch it was compiled against (major.minor) in
``eva_kernels/_build_info.py``; at import, a different running torch makes the ``cpp`` backend
unavailable with that message (the torch and triton backends keep working) instead of loading
an extension built for another ABI.
  EVA_FORCE_CPU_EXT=1 build the CPU-only extension even when CUDA is available.
"""
import glob
import os
import platform
import shutil
import sys

from setuptools import setup

_ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(msg):
    bar = "!" * 78
    print(f"\n{bar}\n[eva-kernels] WARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)


_BUILT_TORCH = [None]  # major.minor of the torch a compiled extension is built against (set by _extension)


def _write_build_info(torch_version: str) -> None:
    """``eva_kernels/_build_info.py``: the torch (major.minor) the extension is compiled against."""
    major_minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    _BUILT_TORCH[0] = major_minor
    path = os.path.join(_ROOT, "eva_kernels", "_build_info.py")
    with open(path, "w") as f:
        f.write('"""Written by setup.py when it builds eva_kernels._C (not tracked by git)."""\n'
                f"BUILT_TORCH = {major_minor!r}  # torch major.minor the extension was compiled against\n")


def _extension():
    """(ext_modules, cmdclass) for setup(); empty when the extension is not built."""
    if _flag("EVA_SKIP_EXT"):
        print("[eva-kernels] EVA_SKIP_EXT=1: not building the C++/CUDA extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except Exception as exc:  # noqa: BLE001 - torch absent: pure-Python install
        _warn(f"torch is not importable at build time ({exc}); building without the C++ "
              "extension. Install torch first, then `pip install --no-build-isolation -e .`.")
        return [], {}

    # -fopenmp: at::parallel_for is a header template; without OpenMP in *this* translation unit
    # it runs serially (torch's wheels use libgomp, so the extension shares torch's pool).
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    machine = platform.machine().lower()
    if _flag("EVA_NATIVE") and not _flag("EVA_PORTABLE"):
        cxx.append("-march=native" if machine in ("x86_64", "amd64", "i686") else "-mcpu=native")
    _write_build_info(torch.__version__)
    sources = [os.path.relpath(p, _ROOT) for p in
               sorted(glob.glob(os.path.join(_ROOT, "csrc", "bindings.cpp")) +
                      glob.glob(os.path.join(_ROOT, "csrc", "cpu", "*.cpp")))]
    include_dirs = [os.path.join(_ROOT, "csrc")]

    nvcc = None
    if torch.version.cuda is not None and not _flag("EVA_FORCE_CPU_EXT"):
        cuda_home = getattr(ce, "CUDA_HOME", None)
        cand = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
        nvcc = cand if cand and os.path.exists(cand) else shutil.which("nvcc")
    if nvcc:
        archs = os.environ.get("EVA_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (s.strip() for s in archs) if a]
        ptx = os.environ.get("EVA_CUDA_PTX", "90").strip()
        if ptx:  # forward compatibility: PTX that the driver JIT-compiles for newer GPUs
            gencode.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
        cu = [os.path.relpath(p, _ROOT) for p in sorted(glob.glob(os.path.join(_ROOT, "csrc", "cuda", "*.cu")))]
        ext = ce.CUDAExtension(
            "eva_kernels._C", sources + cu, include_dirs=include_dirs,
            define_macros=[("EVA_WITH_CUDA", "1")],
            # no --use_fast_math: the fp32 path must keep IEEE division and denormals (exact FMA kernel)
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"] + gencode},
            extra_link_args=link)
        kind = "CUDA (" + ", ".join(gencode) + ")"
    else:
        ext = ce.CppExtension("eva_kernels._C", sources, include_dirs=include_dirs,
                              extra_compile_args={"cxx": cxx}, extra_link_args=link)
        kind = "CPU only" + ("" if torch.version.cuda is None else " (nvcc not found)")
    print(f"[eva-kernels] building eva_kernels._C: {kind}; cxx flags {cxx}", file=sys.stderr)

    base = ce.BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        """BuildExtension that, unless EVA_REQUIRE_EXT=1, survives a failed compile."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                if _flag("EVA_REQUIRE_EXT"):
                    raise
                _warn(f"building {ext.name} failed ({type(exc).__name__}: {exc}); installing "
                      "without it: backend='cpp' will be unavailable. Fix the error above and "
                      "rerun `pip install --no-build-isolation -e .` (EVA_REQUIRE_EXT=1 makes this "
                      "fatal).")

        def copy_extensions_to_source(self):
            try:
                super().copy_extensions_to_source()
            except Exception as exc:  # noqa: BLE001 - the failed build left nothing to copy
                if _flag("EVA_REQUIRE_EXT"):
                    raise
                _warn(f"extension not copied into the source tree ({exc})")

    return [ext], {"build_ext": BuildExt}


#: tested from 2.4.0 to 2.14.1 by `make test-torch-matrix` (op tests; Triton kernels need triton>=3.6)
TORCH_RANGE = "torch>=2.4"


def _requirements(built_torch):
    """install_requires: numpy and torch; a build with the compiled extension pins torch to the
    major.minor it was compiled against (a wheel must not meet another torch's ABI)."""
    if built_torch is None:
        return [TORCH_RANGE, "numpy"]
    return [f"torch=={built_torch}.*", "numpy"]


_ext_modules, _cmdclass = _extension()
setup(ext_modules=_ext_modules, cmdclass=_cmdclass, install_requires=_requirements(_BUILT_TORCH[0]))
