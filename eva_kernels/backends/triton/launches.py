"""How each Triton kernel of this backend is launched, for the compile check.

For every ``@triton.jit`` function of the backend, a :class:`Launch` gives the types of its
runtime arguments, the constexpr *variants* its launcher uses (dtypes and flags), and the
configs (block sizes, warps, stages) it may run with: the autotuning list of an autotuned
kernel, the fixed launch of the others. :mod:`.compile_check` compiles every
(variant, config) for sm_80 and sm_90 and fails on a kernel without a ``Launch`` here, on
spills and on shared memory beyond the target's, unless the case is in :data:`EXCLUDED` with
its reason; the autotuners prune excluded cases at run time (:func:`prune_configs`).

Pointers are described as 16-byte aligned (as torch allocations are), integers as 32-bit:
the common specialisation of a real launch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import triton

from . import chunk_sums as _sums
from . import config as _config_module
from . import cov_update_kernel as _cov
from . import eigen_steps as _eig
from . import upper_bmm as _ubmm

_TORCH_TO_TRITON = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16",
                    "torch.float64": "fp64"}


@dataclass(frozen=True)
class Variant:
    """One specialisation: pointer-type overrides and constexpr values.

    ``mma``: the operand type (PTX spelling: ``bf16``, ``f16``, ``tf32``) of the tensor-core
    instructions (``mma.sync`` on sm_80, ``wgmma`` on sm_90) the compiled kernel must contain;
    the compile check fails a case without them (a path meant for tensor cores that fell back
    to FMAs). ``None``: not checked. ``divisible``: integer arguments compiled as multiples of
    16, as Triton specialises them at launch when they are (with an argument set to the
    constexpr 1 in ``constexprs``/``types``, the specialisation of a unit stride).
    """

    label: str
    types: Dict[str, str]
    constexprs: Dict[str, Any]
    mma: Optional[str] = None
    divisible: Tuple[str, ...] = ()  # integer arguments specialised as multiples of 16


@dataclass(frozen=True)
class Launch:
    """Every way a kernel is launched (see the module docstring)."""

    kernel: Any                      # the JITFunction
    signature: Dict[str, str]        # runtime argument -> Triton type ("*fp32", "i32", ...)
    variants: Tuple[Variant, ...]
    configs: Tuple[triton.Config, ...]
    never_launched: Optional[str] = None  # why a kernel needs no compile (it is never launched)

    @property
    def name(self) -> str:
        return self.kernel.__name__


def config_label(cfg: triton.Config) -> str:
    """``BLOCK=128,BLOCK_K=64/w8/s3``: a config's constexprs, warps and stages."""
    kw = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{kw}/w{cfg.num_warps}/s{cfg.num_stages}"


#: How Triton specialises a launch of ``_cov_update_kernel`` on a row-major ``x`` whose row
#: stride and width are multiples of 16 (every LLM width): the unit column stride becomes a
#: constexpr (vectorised, pipelined loads) and the two are known multiples of 16. The compile
#: check compiles every variant that way and as the generic ``-strided`` kernel of any other
#: view; their register needs differ (128-wide tiles spill only in the generic one).
_CONTIGUOUS = dict(types={"stride_xd": "constexpr"}, constexprs={"stride_xd": 1}, divisible=("stride_xn", "d"))


def _cov_update_variants() -> Tuple[Variant, ...]:
    """Each input dtype with and without a shift (the arithmetic paths: 16-bit as is, 16-bit
    shifted as a bf16 split or, ``-fast``, as raw 16-bit products corrected per chunk, fp32 as
    tf32x3), each for a row-major ``x`` and (``-strided``) any other view, with a mask: the
    unmasked kernel is the same minus one load per row, so it is compiled under the masked
    label."""
    out = []
    for dtype in ("fp32", "fp16", "bf16"):
        for shift, fast in ((False, False), (True, False), (True, True)):
            if fast and dtype == "fp32":
                continue
            lowp = dtype != "fp32" and not shift
            split = dtype != "fp32" and shift and not fast
            native = {"fp16": "f16", "bf16": "bf16"}.get(dtype)
            mma = "tf32" if dtype == "fp32" else ("bf16" if split else native)
            constexprs = dict(HAS_MASK=True, HAS_SHIFT=shift, LOWP_DOT=lowp, SPLIT_DOT=split, CHUNKED=fast,
                              CHUNK=_cov.CHUNK_ROWS, SPLIT_NATIVE=True,
                              FP32_PRECISION=_config_module.GPU_FP32_DOT_PRECISION)
            for strided in (False, True):
                extra = {} if strided else _CONTIGUOUS
                out.append(Variant(variant_label(dtype, shift, fast, strided),
                                   {"x_ptr": f"*{dtype}", **extra.get("types", {})},
                                   {**constexprs, **extra.get("constexprs", {})}, mma=mma,
                                   divisible=extra.get("divisible", ())))
    return tuple(out)


def variant_label(dtype: str, shift: bool, fast: bool = False, strided: bool = False) -> str:
    """``bf16-shift-fast``: the label of a ``cov_update`` variant (Triton dtype spelling)."""
    return f"{dtype}{'-shift' if shift else ''}{'-fast' if fast else ''}{'-strided' if strided else ''}"


def is_contiguous_launch(x) -> bool:
    """Whether a launch on ``x`` (n, d) gets the row-major specialisation (:data:`_CONTIGUOUS`)."""
    return x.stride(1) == 1 and x.stride(0) % 16 == 0 and x.shape[1] % 16 == 0


def _jit(fn):
    """The kernel under an autotuner (or the kernel itself)."""
    from triton.runtime.autotuner import Autotuner
    return fn.fn if isinstance(fn, Autotuner) else fn


LAUNCHES: List[Launch] = [
    Launch(
        kernel=_jit(_cov._cov_update_kernel),
        signature=dict(x_ptr="*fp32", mask_ptr="*u8", shift_ptr="*fp32", cov_ptr="*fp32", colsum_ptr="*fp32",
                       count_ptr="*i64", sums_ptr="*fp32", counts_ptr="*i32", n="i32", d="i32", stride_xn="i32",
                       stride_xd="i32", N_BUCKET="i32", SMS="i32"),
        variants=_cov_update_variants(),
        configs=tuple(_cov.GPU_CONFIGS),
    ),
    Launch(
        kernel=_sums._chunk_sums_kernel,
        signature=dict(x_ptr="*fp32", mask_ptr="*u8", shift_ptr="*fp32", sums_ptr="*fp32", counts_ptr="*i32",
                       n="i32", d="i32", stride_xn="i32", stride_xd="i32"),
        variants=tuple(Variant(t, {"x_ptr": f"*{t}"}, dict(HAS_MASK=True, CHUNK=_cov.CHUNK_ROWS))
                       for t in ("fp16", "bf16")),
        configs=(triton.Config({"BLOCK_D": _sums.BLOCK_D, "BLOCK_R": _sums.BLOCK_R}, num_warps=_sums.NUM_WARPS,
                               num_stages=3),),
    ),
    Launch(
        kernel=_jit(_eig._centered_matmul_kernel),
        signature=dict(a_ptr="*fp32", q_ptr="*fp32", c_ptr="*fp32", n_ptr="*i64", y_ptr="*fp32", d="i32", b="i32",
                       stride_am="i32", stride_ak="i32", stride_qk="i32", stride_qn="i32", stride_ym="i32",
                       stride_yn="i32"),
        variants=tuple(Variant("fp32" + ("-centred" if c else ""), {},
                               dict(HAS_C=c, FP32_PRECISION=_config_module.GPU_FP32_DOT_PRECISION), mma="tf32")
                       for c in (False, True)),
        configs=tuple(_eig.GPU_OP_CONFIGS),
    ),
    Launch(
        kernel=_jit(_ubmm._upper_bmm_kernel),
        signature=dict(addr_ptr="*i64", q_ptr="*fp32", c_ptr="*fp32", n_ptr="*fp32", y_ptr="*fp32", d="i32", b="i32",
                       stride_qg="i32", stride_qk="i32", stride_qn="i32", stride_cg="i32", stride_yg="i32",
                       stride_ym="i32", stride_yn="i32"),
        variants=tuple(Variant("fp32" + ("-centred" if c else ""), {},
                               dict(HAS_C=c, FP32_PRECISION=_config_module.GPU_FP32_DOT_PRECISION), mma="tf32")
                       for c in (False, True)),
        configs=tuple(_ubmm.GPU_CONFIGS),
    ),
    Launch(kernel=_ubmm._accumulate, signature={}, variants=(), configs=(),
           never_launched="a device function inlined into _upper_bmm_kernel (compiled with it)"),
    Launch(
        kernel=_jit(_eig._mirror_kernel),
        signature=dict(src_ptr="*fp32", dst_ptr="*fp32", d="i32"),
        variants=tuple(Variant(t, {"src_ptr": f"*{t}", "dst_ptr": f"*{t}"}, {}) for t in ("fp32", "fp64")),
        configs=(triton.Config({"BLOCK": _eig.MIRROR_BLOCK}, num_warps=_eig.MIRROR_WARPS, num_stages=3),),
    ),
    *(Launch(kernel=helper, signature={}, variants=(), configs=(),
             never_launched="a device function inlined into _cov_update_kernel (compiled with it)")
      for helper in (_cov._round_to_bf16, _cov._split_dot, _cov._row_panels)),
    Launch(
        kernel=_jit(_config_module._probe),
        signature=dict(x_ptr="*i32"),
        variants=(),
        configs=(),
        never_launched="decorated only to detect the interpreter (config.INTERPRET)",
    ),
]

_TF32X3_SPILL = "spills on sm_80: tf32x3 (three TF32 products per fp32 product) needs more registers than fit"
#: (kernel, config label, variant label, sm) -> why this case is pruned at run time. The compile
#: check fails when a listed case stops needing it (so the list stays true).
_WIDE = ("BLOCK=128,BLOCK_K=64/w8/s3", "BLOCK=128,BLOCK_K=32/w8/s4")
_COV_LABELS = tuple(variant_label(t, shift, fast) for t in ("fp32", "fp16", "bf16")
                    for shift, fast in ((False, False), (True, False), (True, True)) if not (fast and t == "fp32"))
_STRIDED_WIDE_SPILL = ("spills: a strided x is loaded element by element (a 64-bit address per element, no vector "
                       "loads) which, beside a 128 x 128 fp32 accumulator, exceeds 255 registers")
_SM80_SPILL = ("spills on sm_80: mma.sync keeps the accumulator and the (split / tf32x3 / chunk-corrected) operands "
               "in registers (sm_90's wgmma reads operands from shared memory)")
#: (kernel, config label, variant label, sm) -> why this case is pruned at run time. The compile
#: check fails when a listed case stops needing it (so the list stays true).
EXCLUDED: Dict[Tuple[str, str, str, int], str] = {
    **{("_cov_update_kernel", cfg, f"{label}-strided", sm): _STRIDED_WIDE_SPILL
       for cfg in _WIDE for label in _COV_LABELS for sm in (80, 90)},
    **{("_cov_update_kernel", cfg, variant, 80): _TF32X3_SPILL
       for cfg in ("BLOCK=64,BLOCK_K=64/w8/s3", "BLOCK=64,BLOCK_K=32/w8/s3", "BLOCK=64,BLOCK_K=32/w4/s3")
       for variant in ("fp32-strided", "fp32-shift-strided")},
    **{("_cov_update_kernel", cfg, variant, 80): _SM80_SPILL for cfg, variant in (
        *((c, v) for c in _WIDE for v in ("fp32", "fp32-shift", "fp16-shift", "bf16-shift")),
        ("BLOCK=64,BLOCK_K=64/w8/s3", "fp32"), ("BLOCK=64,BLOCK_K=16/w4/s3", "fp32"),
        ("BLOCK=64,BLOCK_K=64/w8/s3", "fp32-shift"),
        *((c, f"{t}-shift-fast") for t in ("fp16", "bf16")
          for c in ("BLOCK=128,BLOCK_K=64/w8/s3", "BLOCK=64,BLOCK_K=64/w8/s3", "BLOCK=64,BLOCK_K=32/w4/s3")))},
    ("_cov_update_kernel", "BLOCK=128,BLOCK_K=64/w8/s3", "fp32", 90):
        "spills 76 B on sm_90: tf32x3 operands of 64-deep 128-wide panels (BLOCK_K=32 fits)",
    ("_cov_update_kernel", "BLOCK=128,BLOCK_K=64/w8/s3", "fp32-shift", 90):
        "needs 256 KiB shared memory on sm_90 (> 227 KiB): three stages of 64-deep fp32 panels and the shift",
    **{("_centered_matmul_kernel", cfg, "fp32-centred", 80): _TF32X3_SPILL + " (with the centring epilogue)"
       for cfg in ("BLOCK_M=64,BLOCK_N=32,BLOCK_K=64/w4/s4", "BLOCK_M=64,BLOCK_N=32,BLOCK_K=64/w8/s4")},
    **{("_centered_matmul_kernel", cfg, variant, 80): _TF32X3_SPILL
       for cfg in ("BLOCK_M=128,BLOCK_N=32,BLOCK_K=64/w8/s3", "BLOCK_M=64,BLOCK_N=64,BLOCK_K=64/w8/s3")
       for variant in ("fp32", "fp32-centred")},
    ("_upper_bmm_kernel", "BLOCK_M=64,BLOCK_N=128,BLOCK_K=16/w8/s3", "fp32", 90):
        "spills 24 B on sm_90 (the centred variant, one more reduction, does not: register allocation)",
}


_TRITON36_SPILL = "spills with Triton 3.6 (the GPU machine's), not with 3.9 (make test-torch-matrix)"
#: Other Triton versions compile some configs differently. Per (major, minor): that version's own
#: table, measured by ``make test-torch-matrix`` (the compile check with each torch's Triton);
#: a version without a table uses :data:`EXCLUDED` (the one CI's Triton checks).
EXCLUDED_BY_TRITON: Dict[Tuple[int, int], Dict[Tuple[str, str, str, int], str]] = {
    (3, 6): {
        **{key: reason for key, reason in EXCLUDED.items()
           if (key[0] == "_cov_update_kernel" and not (key[1] == "BLOCK=64,BLOCK_K=64/w8/s3" and key[2].endswith("-fast")))
           or key[:2] == ("_centered_matmul_kernel", "BLOCK_M=64,BLOCK_N=64,BLOCK_K=64/w8/s3")},
        **{("_cov_update_kernel", cfg, variant, 80): _TRITON36_SPILL for cfg, variant in (
            ("BLOCK=64,BLOCK_K=32/w4/s3", "fp16-shift-fast-strided"), ("BLOCK=64,BLOCK_K=32/w4/s3", "bf16-shift-fast-strided"),
            ("BLOCK=64,BLOCK_K=32/w4/s3", "fp32"), ("BLOCK=64,BLOCK_K=16/w4/s3", "fp32-shift"),
            ("BLOCK=64,BLOCK_K=32/w4/s3", "fp32-shift"))},
        **{("_cov_update_kernel", cfg, variant, sm): _TRITON36_SPILL for cfg, variant, sm in (
            ("BLOCK=64,BLOCK_K=64/w8/s3", "fp32-strided", 90), ("BLOCK=64,BLOCK_K=64/w8/s3", "fp32-shift-strided", 90),
            ("BLOCK=64,BLOCK_K=32/w4/s3", "fp32-shift-strided", 90), ("BLOCK=64,BLOCK_K=16/w4/s3", "fp32-shift-strided", 80),
            ("BLOCK=64,BLOCK_K=32/w4/s3", "fp16-strided", 80), ("BLOCK=64,BLOCK_K=32/w4/s3", "bf16-strided", 80),
            *((cfg, f"{t}-shift-strided", sm) for t in ("fp16", "bf16") for sm in (80, 90)
              for cfg in ("BLOCK=64,BLOCK_K=64/w8/s3", "BLOCK=64,BLOCK_K=32/w4/s3")))},
    },
    (3, 8): {  # torch 2.14
        **{key: reason for key, reason in EXCLUDED.items() if key[0] != "_upper_bmm_kernel" and key not in (
            ("_cov_update_kernel", "BLOCK=128,BLOCK_K=64/w8/s3", "fp32", 90),
            ("_cov_update_kernel", "BLOCK=64,BLOCK_K=16/w4/s3", "fp32", 80),
            *(("_cov_update_kernel", cfg, f"{t}-shift-fast", 80) for t in ("fp16", "bf16")
              for cfg in ("BLOCK=64,BLOCK_K=64/w8/s3", "BLOCK=64,BLOCK_K=32/w4/s3")))},
        **{("_cov_update_kernel", "BLOCK=64,BLOCK_K=64/w8/s3", f"{t}-shift", 80): "spills 24 B with Triton 3.8"
           for t in ("fp16", "bf16")},
        **{("_centered_matmul_kernel", cfg, variant, sm): "spills 12-20 B with Triton 3.8 (make test-torch-matrix)"
           for cfg, variant, sm in (("BLOCK_M=64,BLOCK_N=32,BLOCK_K=64/w4/s4", "fp32", 80),
                                    ("BLOCK_M=64,BLOCK_N=32,BLOCK_K=64/w4/s4", "fp32", 90),
                                    ("BLOCK_M=128,BLOCK_N=32,BLOCK_K=64/w8/s3", "fp32", 90),
                                    ("BLOCK_M=64,BLOCK_N=32,BLOCK_K=64/w4/s4", "fp32-centred", 90))},
    },
}


#: (kernel, sm) -> the variants that must keep at least one spill-free 128-wide, 8-warp config
#: there: tiles that feed Hopper's tensor cores at full width (wgmma m64n128) on the paths
#: the engine takes (row-major 16-bit input: unshifted, fast or exact shifted). The compile
#: check fails when one loses them (issue 22).
WIDE_TILES_REQUIRED: Dict[Tuple[str, int], Tuple[str, ...]] = {
    ("_cov_update_kernel", 90): ("fp16", "bf16", "fp16-shift-fast", "bf16-shift-fast", "fp16-shift", "bf16-shift"),
}


def is_wide(cfg: triton.Config) -> bool:
    """A 128-wide (or wider), 8-warp (or more) tile config."""
    return cfg.kwargs.get("BLOCK", 0) >= 128 and cfg.num_warps >= 8


def triton_version() -> Tuple[int, int]:
    """(major, minor) of the Triton that runs here."""
    return tuple(int(p) for p in triton.__version__.split(".")[:2])  # type: ignore[return-value]


def exclusions(version: Optional[Tuple[int, int]] = None) -> Dict[Tuple[str, str, str, int], str]:
    """The exclusion table of Triton ``version`` (default: the running one)."""
    return EXCLUDED_BY_TRITON.get(version or triton_version(), EXCLUDED)


def excluded_reason(kernel: str, cfg: triton.Config, variant: str, sm: int,
                    version: Optional[Tuple[int, int]] = None) -> Optional[str]:
    return exclusions(version).get((kernel, config_label(cfg), variant, sm))


def variant_of_cov_update(x_dtype, has_shift: bool, chunked: bool = False, strided: bool = False) -> str:
    """The :class:`Variant` label of a ``cov_update`` launch (``chunked``: the fast path;
    ``strided``: not :func:`is_contiguous_launch`)."""
    return variant_label(_TORCH_TO_TRITON[str(x_dtype)], has_shift, chunked, strided)


def check_sm(major: int) -> int:
    """The compile-checked target whose rules apply to a device of compute capability ``major``."""
    return 90 if major >= 9 else 80


def prune_configs(kernel: str, configs: List[triton.Config], variant: str, capability_major: int,
                  version: Optional[Tuple[int, int]] = None) -> List[triton.Config]:
    """``configs`` minus those excluded for this kernel, variant and device by the running
    Triton's table (:func:`exclusions`); all of them when every one is excluded."""
    sm = check_sm(capability_major)
    kept = [c for c in configs if excluded_reason(kernel, c, variant, sm, version) is None]
    return kept or list(configs)


__all__ = ["Launch", "Variant", "LAUNCHES", "EXCLUDED", "EXCLUDED_BY_TRITON", "WIDE_TILES_REQUIRED", "exclusions",
           "config_label", "is_wide", "is_contiguous_launch",
           "prune_configs", "variant_of_cov_update"]
