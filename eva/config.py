"""The one owner of every setting and its default: PEFT's ``LoraConfig``/``EvaConfig`` fields
and the engine's own options.

* :data:`EVA_DEFAULTS` — PEFT's ``EvaConfig`` defaults; :data:`DEFAULT_RANK` — the CLI's ``r``.
* :func:`eva_values` — the EVA settings of a ``LoraConfig`` (its ``eva_config`` or the defaults),
  validated. Everything that needs one of them (the default input functions, the LoRA wiring)
  reads it through here, never from the raw config.
* :func:`resolve_settings` — a ``LoraConfig`` plus ``**options`` -> one :class:`EvaSettings`;
  unknown options raise a ``TypeError`` naming them.
* :class:`EvaOptions` — the engine's options and their defaults (the CLI's too).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

from .errors import EvaError
from .sizes import parse_bytes

#: ``EvaOptions.convergence`` values: the default first.
CONVERGENCE_RULES = ("auto", "all_components", "allocated_ranks")

# Upper bounds of the solver options: larger values are mistakes (the block is capped at d anyway).
MAX_OVERSAMPLE = 1024
MAX_ITERS = 100
MAX_FINAL_ITERS = 10_000
MAX_KRYLOV_DEPTH = 64


@dataclass
class EvaOptions:
    """Engine options beyond PEFT's ``EvaConfig`` (pass as keyword ``**options``).

    Attributes:
        centered: PCA of mean-centred activations (PEFT's behaviour). False: uncentred
            second moment (top right-singular vectors of the raw token matrix).
        max_steps: stop after this many batches even if not converged (None: until the
            loader is exhausted). PEFT cycles the loader forever; with exact statistics a
            second pass adds no information, so we stop at the end of the data.
        convergence: which components a layer must converge on before it stops taking data.
            "allocated_ranks": PEFT's rule, the components its layers need under the current rank
            allocation (re-decided at every check). A layer whose rank drops to 0 is *paused*:
            it no longer holds the run up but keeps taking every batch, so if ranks move back to
            it later its estimate has all the data (PEFT stops feeding it). "all_components":
            all of its group's ``r * rho`` components, whatever the allocation; the rule of
            layer-sequential runs, which know the allocation only at the end; it may take more
            batches. "auto" (default): "all_components" when ``memory_budget`` is set (any value,
            "auto" included), so the mode the budget selects never changes the result,
            "allocated_ranks" otherwise. "allocated_ranks" with a ``memory_budget`` is refused.
        on_unconverged: "warn" (default) or "error" when data ran out / max_steps was hit
            while some needed component had not converged (the result is then the exact PCA
            of every token consumed).
        skip_empty_batches: False (default) raises on a batch whose mask keeps no token;
            True skips such batches with a warning.
        skip_rest_of_forward: stop the forward pass once every layer that still needs data
            has captured its input (results are identical, time is saved).
        oversample: extra eigensolver block columns; iters: subspace iterations per solve.
        check_every: solve, reallocate ranks and test convergence every this many batches (1:
            every batch). Between checks the groups only accumulate, so the solves cost 1/k;
            convergence then compares estimates k batches apart (a stricter test) and a group
            may consume up to k - 1 batches after the check it would have passed earlier. The
            components are the exact PCA of the tokens consumed either way. "auto": the gap is
            measured as the run goes, so that the solves stay under 10% of its wall time
            (:mod:`eva.engine.cadence`; the gaps chosen are ``metadata["run"]["cadence"]``).
        batch_solves: True: solve the groups of one width (and rank, device, mode) together,
            in batched calls (:func:`eva_kernels.topk_eigh_batched`: PyTorch's batched GEMM on
            symmetric copies), so that a step's small solver launches do not grow with the
            number of layers. False: one ``topk_eigh`` per group with the backend's products.
            "auto" (default): batched on GPUs (launch-bound) and in distributed runs (one
            all-reduce per iteration and width instead of one per group: collectives are
            latency-bound); per group on one CPU process, where the solves are bound by FLOPs
            and memory and the symmetric copies batching needs cost more than the launches it
            saves (MiniLM bench, 74 steps: 1.8 s batched vs 1.7 s per group). Results agree to
            floating-point rounding. The final polish follows the same choice: batched, every
            width iterates together with one host synchronisation per round.
        rayleigh_ritz: where the batched solves' small (b, b) eigenproblems are solved
            (:mod:`eva_kernels.ops.subspace_batch`): "device" (``torch.linalg.eigh`` per width on
            the statistics' device), "host" (every width's in one float64 transfer per round: one
            host synchronisation, at any block size), or "auto" (default): "host" on CUDA,
            where ``eigh`` synchronises anyway and beyond b = 32 loops matrix by matrix, "device"
            elsewhere (CPU results unchanged). Not measured on a GPU yet.
        batched_products: how the batched solves multiply the statistics
            (:mod:`eva_kernels.ops.batch_operand`): "upper" (one Triton launch per product for
            every group of a width, reading each statistic's upper triangle in place: no d x d
            copy per step; fp32 statistics), "mirror" (symmetric copies stacked once per step,
            then ``torch.bmm``), or "auto" (default): "upper" on CUDA where Triton runs, "mirror"
            elsewhere (CPU results unchanged). An "upper" that cannot run on the GPU falls back to
            "mirror"; ``.metadata["run"]["backends"]["batched_products"]`` says which ran and why.
        solve_batch_bytes: bound on the transient memory of one batched solve with "mirror"
            products (the symmetric copies, ``2 * groups * d^2 * 4`` bytes); more groups are
            solved in several chunks.
        final_tol: residual tolerance ``||C v - theta v|| <= final_tol * theta_1`` of the final
            polish solve (warm-started from the streaming estimate); final_max_iters caps its
            products.
        polish_screen_tol: a screened final polish (:mod:`eva.engine.polish_plan`): every group
            is first polished to this looser residual tolerance, then only the components the
            rank allocation may still keep (those within the screen's error bound of the cutoff
            or above it) are polished to ``final_tol``; groups whose every offer is certainly
            below the cutoff are not polished further. Same ranks and same exact components as
            polishing everything to ``final_tol``; the dropped components' ratios in the metadata
            are accurate to the screen's tolerance. Default 1e-2; None (or <= ``final_tol``):
            every component of every group to ``final_tol``. Runs that calibrate all groups at
            once only (a layer-sequential run polishes each window before the allocation).
        final_krylov_depth: products per cycle of the final polish, a restarted block Krylov
            method (:mod:`eva_kernels.block_krylov`): each cycle grows a basis of that many
            blocks, then one Rayleigh-Ritz and residual test on all of it. "auto" (default): 8 on
            CPU (5-12x fewer products than 1 on flat spectra, measured), 4 on GPUs (not measured
            yet); 1: plain subspace iteration, a test after every product. Capped per layer so
            that the basis fits in half of the layer's width.
        backend: eva_kernels backend ("auto", "torch", "triton", "cpp"; default EVA_BACKEND) of
            ``cov_update``, and of ``topk_eigh`` when that backend implements it (else ``topk_eigh``
            takes ``auto``); the result's metadata names the backend that ran each op.
        orthonormalization: the eigensolver's orthonormalisation ("auto": Householder QR on
            CPU, CholeskyQR3 on GPUs; or "householder", "cholesky_qr3"), whatever the backend.
        statistics_precision: how 16-bit (bf16/fp16) inputs are multiplied into the centred
            statistics (:mod:`eva.engine.precision`). "exact": ``x - shift`` as a bf16 split,
            three tensor-core products (error ~1e-5 on any data). "fast": the raw rows, one
            product, the shift taken out per 512 rows (error ~1e-7 R, ``R = max E[x^2] / max
            Var``). "auto" (default): per group, fast while its measured ``R`` <= 64 (error
            <= 6e-5), exact before its first solve and wherever means dwarf the spread
            (massive-activation channels). Only the ``triton`` backend has a fast path; fp32
            inputs are exact either way. The metadata (``run.statistics_precision``) counts
            the batches of each path.
        seed: seed of the eigensolver's random test matrices.
        memory_budget: bytes the run's statistics (``d x d`` fp32 per shared-input group) may
            occupy, summed over groups and devices: an int, a string such as ``"8GB"`` or
            ``"512MiB"``, or ``"auto"`` (:data:`eva.engine.memory_budget.AUTO_FRACTION` of the
            statistics device's free memory). None (default): no bound. When every group's
            statistic fits, the run is the usual all-at-once run; otherwise it is
            *layer-sequential* (:mod:`eva.engine.sequential`): the model's repeated blocks are
            calibrated a window of blocks at a time, each group converging on all of its
            ``r * rho`` components, and ranks are allocated at the end.
        blocks: dotted name of the model's list of repeated blocks for layer-sequential runs
            (e.g. ``"model.layers"``); None: the largest ``nn.ModuleList`` of same-class modules.
        offload_device: where layer-sequential runs cache each batch's block inputs between
            windows ("cpu" by default; a GPU when it has room).
    """

    centered: bool = True
    convergence: str = "auto"
    max_steps: Optional[int] = None
    on_unconverged: str = "warn"
    skip_empty_batches: bool = False
    skip_rest_of_forward: bool = True
    oversample: int = 8
    iters: int = 2
    check_every: Union[int, str] = 1
    batch_solves: Union[bool, str] = "auto"
    rayleigh_ritz: str = "auto"
    batched_products: str = "auto"
    solve_batch_bytes: int = 1 << 30
    final_tol: float = 1e-4
    final_max_iters: int = 50
    polish_screen_tol: Optional[float] = 1e-2
    final_krylov_depth: Union[int, str] = "auto"
    backend: Optional[str] = None
    orthonormalization: str = "auto"
    statistics_precision: str = "auto"
    seed: int = 0
    memory_budget: Union[None, int, str] = None
    blocks: Optional[str] = None
    offload_device: str = "cpu"

    def __post_init__(self):
        _check_bool("centered", self.centered)
        _check_bool("skip_empty_batches", self.skip_empty_batches)
        _check_bool("skip_rest_of_forward", self.skip_rest_of_forward)
        if self.convergence not in CONVERGENCE_RULES:
            raise EvaError(f"convergence must be one of {CONVERGENCE_RULES}, got {self.convergence!r}")
        if self.on_unconverged not in ("warn", "error"):
            raise EvaError(f"on_unconverged must be 'warn' or 'error', got {self.on_unconverged!r}")
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, 1, None, "must be >= 1 or None")
        _check_int("oversample", self.oversample, 0, MAX_OVERSAMPLE,
                   f"must be an int in [0, {MAX_OVERSAMPLE}] (extra eigensolver columns; 8 is plenty)")
        _check_int("iters", self.iters, 1, MAX_ITERS,
                   f"must be an int in [1, {MAX_ITERS}] (subspace iterations per batch; iters >= 1)")
        if self.check_every != "auto":
            _check_int("check_every", self.check_every, 1, None,
                       "must be an int >= 1 (batches between solves) or 'auto' (solves kept under 10% of the run)")
        if self.batch_solves != "auto":
            _check_bool("batch_solves", self.batch_solves)
        if self.rayleigh_ritz not in ("auto", "device", "host"):
            raise EvaError(f"rayleigh_ritz must be 'auto', 'device' or 'host', got {self.rayleigh_ritz!r}")
        if self.batched_products not in ("auto", "mirror", "upper"):
            raise EvaError(f"batched_products must be 'auto', 'mirror' or 'upper', got {self.batched_products!r}")
        _check_int("solve_batch_bytes", self.solve_batch_bytes, 1, None,
                   "must be an int >= 1 (bytes of one batched solve's symmetric copies, e.g. 1 << 30)")
        _check_int("final_max_iters", self.final_max_iters, 1, MAX_FINAL_ITERS,
                   f"must be an int in [1, {MAX_FINAL_ITERS}]")
        if self.final_krylov_depth != "auto":
            _check_int("final_krylov_depth", self.final_krylov_depth, 1, MAX_KRYLOV_DEPTH,
                       f"must be 'auto' or an int in [1, {MAX_KRYLOV_DEPTH}] (products per polish cycle; "
                       "1: plain subspace iteration)")
        if self.polish_screen_tol is not None and (not _is_real(self.polish_screen_tol)
                                                   or not 0.0 < float(self.polish_screen_tol) < 1.0):
            raise EvaError(f"polish_screen_tol must be None (no screening) or a number in (0, 1) (the "
                           f"screen's relative residual, e.g. 1e-2), got {self.polish_screen_tol!r}")
        _check_int("seed", self.seed, 0, 2**63 - 1, "must be a non-negative int")
        if not _is_real(self.final_tol) or not 0.0 < float(self.final_tol) < 1.0:
            raise EvaError(f"final_tol must be a number in (0, 1) (relative residual of the final solve, "
                           f"e.g. 1e-4), got {self.final_tol!r}")
        self.backend = check_backend(self.backend)
        if self.memory_budget is not None and self.memory_budget != "auto":
            self.memory_budget = parse_bytes(self.memory_budget, "memory_budget")
        if self.memory_budget is not None and self.convergence == "allocated_ranks":
            raise EvaError("convergence='allocated_ranks' cannot be combined with memory_budget: a layer-sequential "
                           "run knows the rank allocation only after the last block, so the result would depend on "
                           "which mode the budget selects; use convergence='auto' (the default) or "
                           "'all_components' with memory_budget, or leave memory_budget unset")
        if self.blocks is not None and (not isinstance(self.blocks, str) or not self.blocks.strip()):
            raise EvaError(f"blocks must be None or the dotted name of the model's block list, e.g. "
                           f"'model.layers'; got {self.blocks!r}")
        self.offload_device = _check_device("offload_device", self.offload_device)
        from .engine.precision import STATISTICS_PRECISIONS
        if self.statistics_precision not in STATISTICS_PRECISIONS:
            raise EvaError(f"statistics_precision must be one of {STATISTICS_PRECISIONS}, "
                           f"got {self.statistics_precision!r}")
        from eva_kernels import ORTHONORMALIZATIONS
        if self.orthonormalization not in ("auto",) + ORTHONORMALIZATIONS:
            raise EvaError(f"orthonormalization must be one of {('auto',) + ORTHONORMALIZATIONS}, "
                           f"got {self.orthonormalization!r}")

    @property
    def convergence_rule(self) -> str:
        """``convergence`` resolved: "all_components" or "allocated_ranks" (see the class docstring)."""
        if self.convergence != "auto":
            return self.convergence
        return "all_components" if self.memory_budget is not None else "allocated_ranks"


def _check_device(name: str, v) -> str:
    """A device name torch understands (not ``meta``), normalised."""
    import torch
    try:
        dev = torch.device(v)
    except (TypeError, RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type == "meta":
        raise EvaError(f"{name} must name a device that holds data, such as 'cpu' or 'cuda:0'; got {v!r}")
    return str(dev)


def _is_real(v) -> bool:
    """A finite real number (bool excluded)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _check_bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise EvaError(f"{name} must be True or False, got {v!r}")


def _check_int(name: str, v, lo: int, hi: Optional[int], rule: str) -> None:
    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)
    if not ok:
        raise EvaError(f"{name} {rule}, got {v!r}")


def check_backend(backend: Optional[str]) -> Optional[str]:
    """Validate ``backend`` (or, when None, the ``EVA_BACKEND`` environment variable) up front.

    Returns the normalised name (None stays None: the environment is read at each call).
    Raises :class:`EvaError` naming the source and the valid choices, before any model runs.
    """
    from eva_kernels import BACKEND_NAMES
    choices = ("auto",) + BACKEND_NAMES
    if backend is None:
        env = os.environ.get("EVA_BACKEND")
        if env is not None and env.strip().lower() not in choices + ("",):
            raise EvaError(f"EVA_BACKEND={env!r} is not a backend; choose one of {', '.join(choices)} "
                           "(or unset EVA_BACKEND)")
        return None
    if not isinstance(backend, str) or backend.strip().lower() not in choices:
        raise EvaError(f"backend must be None or one of {', '.join(choices)}; got {backend!r}")
    return backend.strip().lower()


@dataclass
class EvaSettings:
    """Everything the engine needs, resolved from the PEFT config and the options."""

    r: int
    rank_pattern: Dict[str, int]
    target_modules: Any
    rho: float
    tau: float
    use_label_mask: bool
    label_mask_value: int
    whiten: bool
    adjust_scaling_factors: bool
    options: EvaOptions = field(default_factory=EvaOptions)
    peft_config: Any = None

    def metadata(self) -> Dict[str, Any]:
        out = {k: getattr(self, k) for k in ("r", "rho", "tau", "use_label_mask", "label_mask_value",
                                             "whiten", "adjust_scaling_factors")}
        out["rank_pattern"] = dict(self.rank_pattern)
        tm = self.target_modules
        out["target_modules"] = sorted(tm) if isinstance(tm, (set, list, tuple)) else tm
        out.update({k: v for k, v in dataclasses.asdict(self.options).items()})
        return out


#: PEFT's ``EvaConfig`` defaults (peft.tuners.lora.config.EvaConfig).
EVA_DEFAULTS: Dict[str, Any] = dict(rho=2.0, tau=0.99, use_label_mask=True, label_mask_value=-100, whiten=False,
                                    adjust_scaling_factors=True)
#: The LoRA rank of ``eva init`` when ``--rank`` is not given (PEFT's ``LoraConfig.r``).
DEFAULT_RANK = 8


def eva_values(peft_config: Any) -> Dict[str, Any]:
    """The EVA settings of ``peft_config`` (``eva_config`` fields, else :data:`EVA_DEFAULTS`), validated."""
    eva_cfg = getattr(peft_config, "eva_config", None)
    vals = {k: (getattr(eva_cfg, k) if eva_cfg is not None and hasattr(eva_cfg, k) else v)
            for k, v in EVA_DEFAULTS.items()}
    _check_eva_values(vals)
    return vals


def resolve_settings(peft_config: Any, options: Dict[str, Any]) -> EvaSettings:
    """Build :class:`EvaSettings` from a ``LoraConfig`` (or any object with the same fields)."""
    if peft_config is None:
        raise EvaError("peft_config is required if model is not a PeftModel: pass a "
                       "peft.LoraConfig(r=..., target_modules=..., init_lora_weights='eva')")
    known = {f.name for f in dataclasses.fields(EvaOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"get_eva_state_dict got unknown option(s) {unknown}; known: {sorted(known)}")
    r = getattr(peft_config, "r", None)
    if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 1:
        raise EvaError(f"peft_config.r must be a positive int, got {r!r}")
    vals = eva_values(peft_config)
    rank_pattern = dict(getattr(peft_config, "rank_pattern", None) or {})
    for key, rank in rank_pattern.items():
        if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
            raise EvaError(f"peft_config.rank_pattern[{key!r}] must be a positive int, got {rank!r}")
    return EvaSettings(
        r=int(r),
        rank_pattern=rank_pattern,
        target_modules=getattr(peft_config, "target_modules", None),
        options=EvaOptions(**options),
        peft_config=peft_config,
        **vals,
    )


def _check_eva_values(vals: Dict[str, Any]) -> None:
    """PEFT's ``EvaConfig`` checks (same leading words), plus finiteness and types.

    PEFT validates only in ``EvaConfig.__post_init__``, so a NaN (which passes ``rho < 1.0``) or a
    value set after construction slips through there; here every value is checked before the run.
    """
    rho, tau = vals["rho"], vals["tau"]
    if not _is_real(rho) or float(rho) < 1.0:
        raise EvaError(f"`rho` must be >= 1.0; eva_config.rho is {rho!r} (a finite number >= 1.0: "
                       "the maximum rank of a layer is r * rho)")
    if not _is_real(tau) or not 0.0 <= float(tau) <= 1.0:
        raise EvaError(f"`tau` must be between 0.0 and 1.0.; eva_config.tau is {tau!r} (the cosine "
                       "threshold for convergence, 0.99 by default)")
    for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
        if not isinstance(vals[name], bool):
            raise EvaError(f"eva_config.{name} must be True or False, got {vals[name]!r}")
    lmv = vals["label_mask_value"]
    if not isinstance(lmv, numbers.Integral) or isinstance(lmv, bool):
        raise EvaError(f"eva_config.label_mask_value must be an int (the label of ignored tokens, -100), got {lmv!r}")
