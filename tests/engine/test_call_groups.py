"""Shared-input groups are decided call by call, not at the first call.

DeBERTa-v2 with ``share_att_key=True`` calls ``query_proj`` and ``key_proj`` a second time per
layer, on the relative-position embeddings; ``value_proj`` is called once. The three share their
first input only, so ``value_proj`` must not be credited with the second calls' rows: the group
splits into {query, key} and {value}, noted in the metadata, and every member's statistic holds
exactly the rows that member received.
"""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from helpers import assert_layers_exact, record_layer_calls

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning")

TARGETS = ["query_proj", "key_proj", "value_proj"]


@pytest.fixture(scope="module")
def deberta():
    from transformers import DebertaV2Config, DebertaV2Model
    torch.manual_seed(0)
    cfg = DebertaV2Config(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=64, relative_attention=True, position_buckets=8,
                          pos_att_type=["p2c", "c2p"], share_att_key=True, max_relative_positions=16)
    return DebertaV2Model(cfg).eval()


def data(n=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        am = torch.ones(3, 9, dtype=torch.long)
        am[0, -4:] = 0
        out.append({"input_ids": torch.randint(3, 99, (3, 9), generator=g), "attention_mask": am})
    return out


def tokens_then_positions(layer_input, mask, name):
    """The documented fix for the second call: token rows masked, position-embedding rows all."""
    x = layer_input[0]
    return x[mask] if tuple(x.shape[:2]) == tuple(mask.shape) else x.reshape(-1, x.shape[-1])


def received(model, batches, names):
    """What each layer really received, every call, through the same rule."""
    calls = record_layer_calls(model, batches, names)
    out = {}
    for n in names:
        rows = []
        for b, layer_calls in zip(batches, calls[n]):
            for x in layer_calls:
                rows.append(tokens_then_positions((x,), b["attention_mask"].bool(), n))
        out[n] = torch.cat(rows)
    return out


def test_second_call_on_other_input_is_refused_by_default_with_the_fix(deberta):
    cfg = LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(tau=1.0))
    with pytest.raises(eva.EvaError, match=r"query_proj: its input of shape \(1, 16, 32\) \(call 2 of the layer in one "
                                           r"forward: it is called again on another input\) does not fit.*"
                                           r"eva\.layer_input_rules"):
        eva.get_eva_state_dict(deberta, data(), cfg, show_progress_bar=False)


@pytest.mark.parametrize("rules", ["fix", "one-function"])
def test_members_get_exactly_the_rows_they_received(deberta, token_spy, rules):
    """"fix": the error's advice (query/key get the function, value keeps the default);
    "one-function": one function for all three, so they share their first input's rule."""
    batches = data()
    cfg = LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(tau=1.0))
    names = [n for n, _ in deberta.named_modules() if n.endswith(("query_proj", "key_proj"))]
    rules = (eva.layer_input_rules({n: tokens_then_positions for n in names}) if rules == "fix"
             else tokens_then_positions)
    sd = eva.get_eva_state_dict(deberta, batches, cfg, show_progress_bar=False, prepare_layer_inputs_fn=rules,
                                observers=[token_spy])
    truth = received(deberta, batches, list(sd))
    assert_layers_exact(sd, truth)
    kept = sum(int(b["attention_mask"].sum()) for b in batches)
    for name, info in sd.metadata["layers"].items():
        expected = kept + 3 * 16 if name.endswith(("query_proj", "key_proj")) else kept
        assert info["tokens"] == expected, name
        # the observer saw exactly what each statistic consumed (the first batch once)
        assert sum(r.shape[0] for r in token_spy[info["group"]]) == expected, name
    groups = sd.metadata["groups"]
    assert ["encoder.layer.0.attention.self.query_proj", "encoder.layer.0.attention.self.key_proj"] in groups
    assert ["encoder.layer.0.attention.self.value_proj"] in groups
    if rules is tokens_then_positions:  # q, k, v shared the first input: split after the first forward
        assert sd.metadata["groups_split"][0] == ["encoder.layer.0.attention.self.query_proj",
                                                  "encoder.layer.0.attention.self.key_proj",
                                                  "encoder.layer.0.attention.self.value_proj"]
