"""The engine on a CUDA GPU (skipped without CUDA; run by ``make gpu-check``).

* fp32 model: against the same run on CPU. Same batches, every group run to the end of the data
  (tau = 1), so both consume the same tokens: same subspaces, same ranks.
* bf16 model (GPU and CPU bf16 forwards differ by rounding): against the exact PCA of the very
  tokens the GPU run consumed.
"""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
import eva_kernels
from eva.testing import TokenRecorder, check_against_exact
from helpers import random_token_batches

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by make gpu-check)"),
              pytest.mark.filterwarnings("ignore:EVA stopped")]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _run(model, batches, **kw):
    cfg = LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0, tau=1.0))
    return eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, **kw)


@pytest.fixture(params=["torch", "triton", "cpp"])
def backend(request):
    if request.param not in eva_kernels.available_backends("cuda"):
        pytest.skip(f"{request.param} cannot run on CUDA here")
    return request.param


def _batches(model):
    return random_token_batches(model.config.vocab_size, 6, batch=4, seq=15, seed=7)


def test_cuda_matches_cpu(tiny_llama, backend):
    batches = _batches(tiny_llama)
    ref = _run(copy.deepcopy(tiny_llama), batches, backend="torch")
    gpu = _run(copy.deepcopy(tiny_llama).cuda(), batches, backend=backend)
    assert gpu.metadata["run"]["backends"]["cov_update"] == backend
    for name in ref:
        a, b = ref.metadata["layers"][name], gpu.metadata["layers"][name]
        assert (a["tokens"], a["steps"], a["rank"]) == (b["tokens"], b["steps"], b["rank"]), name
        if a["rank"]:
            overlap = float(eva_kernels.subspace_overlap(ref[name].double(), gpu[name].double().cpu()))
            assert overlap >= 0.999, f"{name}: overlap {overlap:.6f} between the CPU and the CUDA run"


def test_bf16_on_cuda_matches_exact_pca(tiny_llama, backend):
    seen = TokenRecorder()
    sd = _run(copy.deepcopy(tiny_llama).to(torch.bfloat16).cuda(), _batches(tiny_llama), backend=backend,
              observers=[seen])
    assert sd.metadata["run"]["backends"]["cov_update"] == backend
    check_against_exact(sd, seen, min_overlap=0.999)
