"""Massive-activation channels in 16-bit models: the variance floor is per element.

A Llama whose embedding channel 0 carries a large offset (+10, +100, +1000) stands in for the
massive activations of real LLMs. In bf16 and fp16 every layer whose float64 statistics show real
variation (some feature varying beyond the rounding of its own elements) keeps its rank, with
components and ratios equal to the float64 PCA of the 16-bit tokens it consumed and ranks equal
to a float64 allocation; only layers whose 16-bit input really is constant up to rounding (the
attention output at +1000 in bf16: v is rounded to a constant) get rank 0. The fp32 model flags
nothing.
"""
from __future__ import annotations


import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from eva.engine.allocation import redistribute_ranks
from eva.testing import TokenRecorder, check_against_exact
from eva_kernels.testing import exact_pca
from helpers import random_token_batches, tiny_llama_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
pytestmark = pytest.mark.filterwarnings("ignore:EVA.*:UserWarning")


def cfg():
    return LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(tau=1.0))


@pytest.fixture(scope="module")
def data():
    return random_token_batches(97, 6, batch=4, seq=16)


def model_with_offset(offset, dtype):
    model = tiny_llama_model(layers=2)
    with torch.no_grad():
        model.embed_tokens.weight[:, 0] += offset
    return model.to(dtype)


def varies(rows: torch.Tensor, roundoff: float) -> bool:
    """float64: some feature's variance exceeds the rounding of its own elements."""
    var = rows.var(0, unbiased=False) * rows.shape[0]
    raw = (rows * rows).sum(0)
    return bool((var > max(2.0 ** -32, roundoff ** 2) * raw).any())


def run(model, data):
    rec = TokenRecorder()
    sd = eva.get_eva_state_dict(model, data, cfg(), show_progress_bar=False, observers=[rec])
    return sd, rec


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("offset", [10.0, 100.0, 1000.0])
def test_16bit_models_with_massive_channels(offset, dtype, data):
    sd, rec = run(model_with_offset(offset, dtype), data)
    layers = sd.metadata["layers"]
    roundoff = torch.finfo(dtype).eps / 2
    real = {}
    for name, info in layers.items():
        rows = torch.cat(rec[info["group"]])
        real[name] = varies(rows, roundoff)
        assert info["zero_variance"] == (not real[name]), (name, info["zero_variance"])
    if offset <= 100.0 or dtype == torch.float16:
        assert all(real.values()), "the float64 PCA finds real variation in every layer here"
    check_against_exact(sd, rec)
    # ranks: the float64 allocation of the float64 ratios of the same tokens
    exact = {}
    for name, info in layers.items():
        rows = torch.cat(rec[info["group"]])
        s, _, _ = exact_pca([rows], info["max_components"])
        exact[name] = ((s[: info["max_components"]] ** 2) / (s ** 2).sum()).tolist() if real[name] else []
    expected = redistribute_ranks(list(layers), {n: i["max_components"] for n, i in layers.items()}, exact,
                                  sd.metadata["run"]["rank_budget"])
    assert sd.ranks == expected


def test_fp32_model_flags_nothing(data):
    sd, _ = run(model_with_offset(1000.0, torch.float32), data)
    assert not any(i["zero_variance"] for i in sd.metadata["layers"].values())
