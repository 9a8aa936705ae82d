"""Bad arguments and settings are rejected before the model is touched.

A missing ``peft_config``, unknown options, every invalid ``eva_config`` field / run option, a
bad rank or ``rank_pattern``, an unknown backend (argument or ``EVA_BACKEND``): each raises a
clear error before any forward and any train()/eval() call, and leaves the model exactly as it
was (see ``model_state``). The ``cpp`` backend (cov_update only) runs, with the torch solver.
"""
from __future__ import annotations

import warnings

import pytest

import eva
import eva_kernels
from eva import EvaError
from model_state import Spy, assert_restored, batches, lora_config, run, snapshot, untouched

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning", "ignore:lora with eva initialization")


def test_peft_config_required_for_plain_model(gpt2):
    with untouched(gpt2) as spy, pytest.raises(EvaError, match=r"peft_config is required.*LoraConfig"):
        eva.get_eva_state_dict(gpt2, batches(2), forward_fn=spy.forward_fn, show_progress_bar=False)


def test_unknown_option_is_a_type_error(gpt2):
    with untouched(gpt2) as spy, pytest.raises(TypeError, match=r"unknown option\(s\) \['max_step'\].*max_steps"):
        run(gpt2, batches(2), forward_fn=spy.forward_fn, max_step=3)


def _cfg_with(**eva_fields):
    cfg = lora_config(["c_attn"])
    for k, v in eva_fields.items():  # EvaConfig validates in __post_init__: bypass it
        setattr(cfg.eva_config, k, v)
    return cfg


@pytest.mark.parametrize("cfg_kw, options, message", [
    (dict(rho=0.5), {}, r"^`rho` must be >= 1\.0.*eva_config\.rho is 0\.5"),
    (dict(rho=float("nan")), {}, r"^`rho` must be >= 1\.0.*eva_config\.rho is nan"),
    (dict(rho=float("inf")), {}, r"^`rho` must be >= 1\.0.*eva_config\.rho is inf"),
    (dict(tau=1.5), {}, r"^`tau` must be between 0\.0 and 1\.0\..*eva_config\.tau is 1\.5"),
    (dict(tau=-0.1), {}, r"^`tau` must be between 0\.0 and 1\.0\."),
    (dict(tau=float("nan")), {}, r"^`tau` must be between 0\.0 and 1\.0\..*nan"),
    (dict(whiten="yes"), {}, r"eva_config\.whiten must be True or False, got 'yes'"),
    (dict(label_mask_value=1.5), {}, r"eva_config\.label_mask_value must be an int"),
    ({}, dict(max_steps=0), r"max_steps must be >= 1 or None, got 0"),
    ({}, dict(max_steps=2.5), r"max_steps must be >= 1 or None, got 2\.5"),
    ({}, dict(on_unconverged="ignore"), r"on_unconverged must be 'warn' or 'error', got 'ignore'"),
    ({}, dict(iters=0), r"iters >= 1"),
    ({}, dict(oversample=10**6), r"oversample must be an int in \[0, 1024\].*got 1000000"),
    ({}, dict(oversample=-1), r"oversample must be an int in \[0, 1024\]"),
    ({}, dict(final_tol=-1), r"final_tol must be a number in \(0, 1\).*got -1"),
    ({}, dict(final_tol=float("nan")), r"final_tol must be a number in \(0, 1\)"),
    ({}, dict(final_max_iters=0), r"final_max_iters must be an int in \[1, 10000\]"),
    ({}, dict(final_krylov_depth=0), r"final_krylov_depth must be 'auto' or an int in \[1, 64\].*got 0"),
    ({}, dict(final_krylov_depth="deep"), r"final_krylov_depth must be 'auto' or an int in \[1, 64\]"),
    ({}, dict(batched_products="fast"), r"batched_products must be 'auto', 'mirror' or 'upper', got 'fast'"),
    ({}, dict(centered="no"), r"centered must be True or False, got 'no'"),
    ({}, dict(seed=-3), r"seed must be a non-negative int, got -3"),
], ids=["rho<1", "rho=nan", "rho=inf", "tau>1", "tau<0", "tau=nan", "whiten=str", "label_mask_value=float",
        "max_steps=0", "max_steps=float", "on_unconverged", "iters=0", "oversample=1e6", "oversample<0",
        "final_tol<0", "final_tol=nan", "final_max_iters=0", "krylov_depth=0", "krylov_depth=str", "batched_products", "centered=str", "seed<0"])
def test_bad_settings(gpt2, cfg_kw, options, message):
    with untouched(gpt2) as spy, pytest.raises(EvaError, match=message):
        run(gpt2, batches(2), _cfg_with(**cfg_kw), forward_fn=spy.forward_fn, **options)


@pytest.mark.parametrize("r", [0, True, 2.0, None], ids=["zero", "bool", "float", "none"])
def test_bad_rank(gpt2, r):
    cfg = lora_config(["c_attn"])
    cfg.r = r
    with untouched(gpt2) as spy, pytest.raises(EvaError, match=rf"peft_config\.r must be a positive int, got {r!r}"):
        run(gpt2, batches(2), cfg, forward_fn=spy.forward_fn)


def test_bad_rank_pattern(gpt2):
    cfg = lora_config(["c_attn"])
    cfg.rank_pattern = {"h.0.attn.c_attn": 0}
    spy = Spy(gpt2)
    with pytest.raises(EvaError, match=r"rank_pattern\['h\.0\.attn\.c_attn'\] must be a positive int, got 0"):
        run(gpt2, batches(2), cfg, forward_fn=spy.forward_fn)
    spy.assert_untouched()


# ------------------------------------------------------------------------- backends --------
def test_unknown_eva_backend_env_rejected_before_the_model_runs(gpt2, monkeypatch):
    monkeypatch.setenv("EVA_BACKEND", "cuda-fast")
    with untouched(gpt2) as spy, \
            pytest.raises(EvaError, match=r"EVA_BACKEND='cuda-fast' is not a backend; choose one of auto, torch"):
        run(gpt2, batches(2), forward_fn=spy.forward_fn)


def test_bad_backend_rejected_before_the_model_runs(gpt2_train):
    spy = Spy(gpt2_train)
    with pytest.raises(ValueError, match="bogus"):
        run(gpt2_train, batches(2), forward_fn=spy.forward_fn, backend="bogus")
    spy.assert_untouched()


def test_bad_backend_leaves_model_clean(gpt2):
    before = snapshot(gpt2)
    with pytest.raises(ValueError, match=r"backend.*'bogus'"):  # EvaError is a ValueError
        run(gpt2, batches(2), backend="bogus")
    assert_restored(gpt2, before)


@pytest.mark.skipif("cpp" not in eva_kernels.available_backends("cpu"), reason="C++ extension not built")
def test_cpp_backend_runs_on_cpu(gpt2_train):
    """'cpp' implements only cov_update: the eigensolver must fall back instead of failing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sd = run(gpt2_train, batches(2), lora_config(["c_attn"]), backend="cpp")
    assert sd.metadata["run"]["backend"] == "cpp"
    assert sd.metadata["run"]["backends"] == {"cov_update": "cpp", "topk_eigh": "torch"}
