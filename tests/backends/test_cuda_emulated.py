"""The CUDA C++ kernel (csrc/cuda/cov_update_cuda.cu) run on CPU threads, against the float64 spec.

No GPU runs in CI, so the .cu file is compiled as C++ by g++ against a small CPU emulation of
the CUDA it uses (tests/cuda_emu/include/cuda_emu.h: threads and barriers, shared memory,
128-bit and WMMA loads with the hardware's alignment rules, WMMA 16x16x16 with exact products
and fp32 accumulation, bf16/fp16 rounding, device attributes) and called through ctypes. This
checks the kernel's indexing, masking, strides, vector-load conditions, pipeline barriers,
split-n atomics, the bf16 split and the launcher's choice of kernel on every compute capability;
timing, coalescing and register use are the GPU bench's and ``make nvcc-check``'s business.

``EVA_EMU_TSAN=1`` builds the emulation with ThreadSanitizer (a data race in the kernel, e.g. a
missing barrier, is then reported; run one test file at a time with
``LD_PRELOAD=$(g++ -print-file-name=libtsan.so)``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from eva_kernels.ops.cov_update import SPLIT_PRODUCT_ERROR
from eva_kernels.testing import cov_update_spec

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "csrc" / "cuda" / "cov_update_cuda.cu", ROOT / "csrc" / "cuda" / "cov_update_cuda.cuh",
           ROOT / "tests" / "cuda_emu" / "runner.cpp", *sorted((ROOT / "tests" / "cuda_emu" / "include").glob("*.h"))]
XDTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """The emulated kernel as a ctypes library (built once per session; g++ with C++20)."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no C++ compiler (g++) to build the CUDA kernel's CPU emulation")
    tsan = os.environ.get("EVA_EMU_TSAN") == "1"
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + bytes([tsan])).hexdigest()[:16]
    lib = tmp_path_factory.mktemp("cuda_emu") / f"emu_{digest}.so"
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
           f"-I{ROOT / 'tests' / 'cuda_emu' / 'include'}", f"-I{ROOT / 'csrc'}",
           *(["-fsanitize=thread"] if tsan else []),
           "-x", "c++", str(SOURCES[0]), "-x", "none", str(ROOT / "tests" / "cuda_emu" / "runner.cpp"), "-o", str(lib)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, f"building the CUDA emulation failed:\n{' '.join(cmd)}\n{out.stderr[-4000:]}"
    so = ctypes.CDLL(str(lib))
    p, ll, i = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    so.eva_emu_cov_update.argtypes = [p, p, p, p, i, ll, ll, ll, ll, p, p, i, i, i, ctypes.c_char_p, i]
    so.eva_emu_cov_update.restype = i
    so.eva_emu_vector_loads.argtypes = [i]
    so.eva_emu_vector_loads.restype = ll
    return so


def run_emulated(emu, cov, colsum, x, mask=None, shift=None, *, major=9, sms=4, blocks_per_sm=2):
    """cov_update_cuda_launch on the emulated GPU; returns (kept-row count or None, 128-bit loads)."""
    count = torch.zeros((), dtype=torch.int64)
    msg = ctypes.create_string_buffer(256)
    emu.eva_emu_vector_loads(1)
    status = emu.eva_emu_cov_update(
        cov.data_ptr(), colsum.data_ptr(), count.data_ptr(), x.data_ptr(), XDTYPE[x.dtype], x.shape[0], x.shape[1],
        x.stride(0), x.stride(1), None if mask is None else mask.data_ptr(),
        None if shift is None else shift.data_ptr(), sms, major, blocks_per_sm, msg, len(msg))
    assert status == 0, f"emulated launch failed ({status}): {msg.value.decode()}"
    return (int(count) if mask is not None else None), emu.eva_emu_vector_loads(1)


def _layout(n, d, dtype, layout, g):
    """(n, d) rows (mean 2, std 3) in ``dtype`` with the given memory layout."""
    def base(*shape):
        return (torch.randn(*shape, generator=g) * 3 + 2).to(dtype)
    views = {
        "contiguous": lambda: base(n, d),
        "padded_rows": lambda: base(n, (d + 15) // 16 * 16 + 16)[:, :d],   # aligned rows, ragged d
        "odd_row_stride": lambda: base(n, d + 3)[:, :d],                     # rows not 16-byte aligned
        "misaligned_start": lambda: base(n, d + 8)[:, 1:1 + d],              # x itself not aligned
        "transposed": lambda: base(d, n).t(),                               # column stride n
        "every_other_row": lambda: base(2 * n, d)[::2],
    }
    return views[layout]()


def _split_expectation(y: torch.Tensor) -> torch.Tensor:
    """float64 value of the three bf16 products of the split of fp32 ``y`` (rows = tokens)."""
    hi = y.bfloat16().float()
    lo = (y - hi).bfloat16().float()
    hi, lo = hi.double(), lo.double()
    return hi.mT @ hi + hi.mT @ lo + lo.mT @ hi


def _check(emu, x, mask, shift, *, major=9, sms=4):
    n, d = x.shape
    g = torch.Generator().manual_seed(11)
    cov0 = torch.randn(d, d, generator=g)
    col0 = torch.randn(d, generator=g)
    cov, colsum = cov0.clone(), col0.clone()
    count, vec_loads = run_emulated(emu, cov, colsum, x, mask, shift, major=major, sms=sms)
    ref, ref_col = cov0.double(), col0.double()
    kept = cov_update_spec(ref, ref_col, x, mask, shift)
    if mask is not None:
        assert count == kept
    upper = torch.triu(torch.ones(d, d, dtype=torch.bool))
    assert torch.equal(cov[~upper], cov0[~upper]), "the strictly lower triangle must not be touched"
    y = (x.float() if mask is None else x.float()[mask]) - (0 if shift is None else shift)
    absy = y.double().abs()
    k = y.shape[0] + 2
    split = shift is not None and x.dtype != torch.float32 and major >= 8
    bound = (2 * k * 2.0 ** -24 + (1.01 * SPLIT_PRODUCT_ERROR if split else 0.0)) * (absy.mT @ absy + cov0.double().abs())
    err = (cov.double() - ref).abs()
    assert bool((err <= bound + 1e-30)[upper].all()), \
        f"max error {float(err[upper].max()):.3g} beyond the bound (max {float(bound[upper].max()):.3g})"
    if split:  # and the split is what ran: equal to its three products up to fp32 accumulation
        exp = cov0.double() + _split_expectation(y)
        assert bool(((cov.double() - exp).abs() <= 2 * k * 2.0 ** -24 * (absy.mT @ absy + cov0.double().abs())
                     + 1e-30)[upper].all())
    cbound = 2 * k * 2.0 ** -24 * (absy.sum(0) + col0.double().abs())
    assert bool(((colsum.double() - ref_col).abs() <= cbound + 1e-30).all()), "column sums"
    return vec_loads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shifted", [False, True], ids=["raw", "shift"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "mask"])
@pytest.mark.parametrize("nd", [(1, 5), (300, 64), (600, 70), (97, 130)], ids=lambda v: f"n{v[0]}d{v[1]}")
def test_matches_spec(emu, dtype, shifted, masked, nd):
    """Every kernel (tc / split / fma) on ragged sizes, one and several n-chunks (atomics)."""
    n, d = nd
    g = torch.Generator().manual_seed(n * 1000 + d)
    x = _layout(n, d, dtype, "contiguous", g)
    mask = (torch.rand(n, generator=g) < 0.6) if masked else None
    shift = (x[:3].float().mean(0) + 0.01 * torch.randn(d, generator=g)) if shifted else None
    _check(emu, x, mask, shift)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "padded_rows", "odd_row_stride", "misaligned_start",
                                    "transposed", "every_other_row"])
def test_layouts_and_vector_loads(emu, dtype, layout):
    """Any strides; 128-bit loads exactly when rows and x are 16-byte aligned with unit column stride."""
    n, d = 150, 77
    g = torch.Generator().manual_seed(3)
    x = _layout(n, d, dtype, layout, g)
    shift = x[:4].float().mean(0)
    vec_loads = _check(emu, x, None, shift)
    esize = x.element_size()
    aligned = x.stride(1) == 1 and (x.stride(0) * esize) % 16 == 0 and x.data_ptr() % 16 == 0
    assert (vec_loads > 0) == aligned, f"{layout}: {vec_loads} vector loads"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_below_sm80_falls_back_to_exact_fma(emu, dtype):
    """sm_7x has no bf16 WMMA: the launcher takes the exact fp32 kernel (no trap), shifted or not."""
    g = torch.Generator().manual_seed(4)
    x = _layout(200, 70, dtype, "contiguous", g)
    shift = x[:4].float().mean(0)
    _check(emu, x, None, None, major=7)
    _check(emu, x, None, shift, major=7)  # exact: checked against the fp32-only bound


def test_masked_rows_are_never_read(emu):
    """NaN / Inf in dropped rows never reach the sums (they are not even loaded)."""
    g = torch.Generator().manual_seed(6)
    x = _layout(300, 70, torch.bfloat16, "contiguous", g)
    mask = torch.rand(300, generator=g) < 0.5
    x[~mask] = float("nan")
    x[~mask][:, :3] = float("inf")
    shift = x[mask][:4].float().mean(0)
    _check(emu, x, mask, shift)
    _check(emu, x, torch.zeros(300, dtype=torch.bool), shift)


def test_many_chunks_accumulate(emu):
    """A large GPU (many SMs) splits n into many chunks combined with atomics: same result."""
    g = torch.Generator().manual_seed(8)
    x = _layout(2000, 40, torch.float16, "contiguous", g)
    shift = x[:4].float().mean(0)
    _check(emu, x, None, shift, sms=64)
