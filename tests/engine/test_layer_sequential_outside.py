"""Layer-sequential runs and targets outside the block list.

Targets outside every block (BERT's pooler, an encoder-decoder's other stack) are calibrated all
at once after the windows, with full forwards over the same batches: the result equals the
all-at-once run. When they cannot fit the budget together, the refusal offers the fixes that work
(another block list, only when its own outside targets fit; a budget; leaving them out), each
tested by following it. The block list is picked by where the targets are.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from eva.engine.memory_budget import statistic_bytes
from helpers import random_token_batches

from test_layer_sequential import assert_same_result

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning")


def _run(model, batches, cfg, **kw):
    kw.setdefault("polish_screen_tol", None)  # references polished like a layer-sequential run (see there)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "EVA stopped")
        return eva.get_eva_state_dict(model, batches, cfg, show_progress_bar=False, **kw)


def cfg(targets, tau=0.9):
    return LoraConfig(r=2, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(tau=tau))


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=64)).eval()


@pytest.fixture(scope="module")
def bart():
    from transformers import BartConfig, BartModel
    torch.manual_seed(0)
    return BartModel(BartConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                decoder_ffn_dim=48, max_position_embeddings=64)).eval()


def test_pooler_outside_the_blocks_is_calibrated_after_them(bert):
    batches = random_token_batches(99, 6, batch=3, seq=11)
    block = 4 * statistic_bytes(32, True) + statistic_bytes(48, True)  # q/k/v, 2 dense(32), intermediate, output(48)
    ref = _run(bert, batches, cfg("all-linear"), convergence="all_components")  # a budget's rule
    sd = _run(bert, batches, cfg("all-linear"), memory_budget=block)
    run = sd.metadata["run"]
    assert run["mode"] == "layer_sequential"
    assert [w["blocks"] for w in run["windows"]] == [[0, 0], [1, 1], [2, 2], None]
    assert run["windows"][-1]["layers"] == 1  # pooler.dense, all at once after the blocks
    assert_same_result(sd, ref)


#: BART targets in the encoder only, the budget of two of their statistics
ENCODER_TARGETS = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.q_proj",
                   "encoder.layers.0.fc1", "encoder.layers.1.fc1"]
TWO = statistic_bytes(32, True) * 2


@pytest.fixture(scope="module")
def bart_encoder_run(bart):
    """Batches, config and the all-at-once reference (a 1 TB budget: the same convergence rule)."""
    batches = random_token_batches(99, 4, batch=3, seq=11)
    config = cfg(ENCODER_TARGETS)
    return batches, config, _run(bart, batches, config, memory_budget="1TB")


def test_encoder_targets_pick_the_encoder_list(bart, bart_encoder_run):
    batches, config, ref = bart_encoder_run
    sd = _run(bart, batches, config, memory_budget=TWO)
    assert sd.metadata["run"]["mode"] == "layer_sequential"
    assert [w["blocks"] for w in sd.metadata["run"]["windows"]] == [[0, 0], [1, 1]]  # encoder.layers, no tail
    assert_same_result(sd, ref)


def test_outside_targets_that_do_not_fit_get_fixes_that_work(bart, bart_encoder_run):
    batches, config, ref = bart_encoder_run
    budget = TWO
    with pytest.raises(eva.EvaError) as err:
        _run(bart, batches, config, memory_budget=budget, blocks="decoder.layers")
    msg = str(err.value)
    assert "the targets outside them (['encoder.layers.0.self_attn.q_proj'" in msg
    assert "pass blocks='encoder.layers' (holds encoder.layers.0.self_attn.q_proj" in msg
    least = int(re.search(r"a memory_budget of at least (\d+) bytes", msg).group(1))
    # fix 1: the suggested block list
    assert_same_result(_run(bart, batches, config, memory_budget=budget, blocks="encoder.layers"), ref)
    # fix 2: the smallest budget named (here every target is outside the list: all at once)
    assert_same_result(_run(bart, batches, config, memory_budget=least, blocks="decoder.layers"), ref)
    # fix 3: leave them out
    keep = ["encoder.layers.0.self_attn.q_proj"]
    sd = _run(bart, batches, cfg(keep), memory_budget=budget, blocks="decoder.layers")
    assert list(sd) == keep


def test_t5_cannot_be_replayed_block_by_block_and_the_budget_fix_works():
    """T5's first block computes the position bias every later block receives: the refusal is
    right, and names the budget that runs everything at once."""
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                num_heads=4, decoder_start_token_id=0)).eval()
    data = [{"input_ids": torch.randint(1, 99, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "labels": torch.randint(1, 99, (2, 5))} for _ in range(3)]
    config = cfg(["q", "k", "v", "o", "wi", "wo"])
    with pytest.raises(eva.EvaError, match=r"replays the blocks of decoder.block one at a time, which is not exact "
                                           r"for this model: block decoder.block.1's positional argument 2 depends on "
                                           r"what the blocks before it computed.*memory_budget=(\d+)") as err:
        _run(model, data, config, memory_budget=12000)
    need = int(re.search(r"memory_budget=(\d+) \(all statistics at once\)", str(err.value)).group(1))
    sd = _run(model, data, config, memory_budget=need)
    assert sd.metadata["run"]["mode"] == "all_at_once"
    assert_same_result(sd, _run(model, data, config, convergence="all_components"))
