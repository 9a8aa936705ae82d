"""Layer inputs of other shapes than (B, T, d): flattened (B*T, d) inputs take the flattened mask
(OPT's fc1/fc2), and a layer whose input the rules cannot read is refused with a fix that, when
followed, gives every layer the right tokens."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig
from torch import nn

import eva
from helpers import assert_layers_exact, record_layer_calls

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning")


def cfg(targets, r=2):
    return LoraConfig(r=r, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(tau=1.0))


def padded_batches(n, batch=3, seq=9, vocab=99, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        am = torch.ones(batch, seq, dtype=torch.long)
        am[0, -4:] = 0
        am[-1, -1:] = 0
        out.append({"input_ids": torch.randint(3, vocab, (batch, seq), generator=g), "attention_mask": am})
    return out


def masked_truth(model, data, names, rows_of=None):
    """Each layer's recorded input, kept where the attention mask keeps (flattened when the input is)."""
    calls = record_layer_calls(model, data, names)
    truth = {}
    for n in names:
        kept = []
        for b, (x,) in zip(data, calls[n]):
            mask = b["attention_mask"].bool()
            kept.append(rows_of(n, x, mask) if rows_of else x.reshape(-1, x.shape[-1])[mask.reshape(-1)])
        truth[n] = torch.cat(kept)
    return truth


def test_flattened_inputs_take_the_flattened_mask():
    from transformers import OPTConfig, OPTModel
    torch.manual_seed(0)
    model = OPTModel(OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                               max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    data = padded_batches(3)
    sd = eva.get_eva_state_dict(model, data, cfg(["q_proj", "fc1", "fc2"]), show_progress_bar=False)
    calls = record_layer_calls(model, data, ["decoder.layers.0.fc1"])
    assert calls["decoder.layers.0.fc1"][0][0].dim() == 2  # OPT really flattens: (B*T, d)
    assert_layers_exact(sd, masked_truth(model, data, list(sd)))
    kept = sum(int(b["attention_mask"].sum()) for b in data)
    assert all(info["tokens"] == kept for info in sd.metadata["layers"].values())


class SequenceFirst(nn.Module):
    """``second`` is fed (T, B, d), which no token rule can read from a (B, T) mask."""

    def __init__(self, vocab=99, d=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.first = nn.Linear(d, d)
        self.second = nn.Linear(d, d)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.first(self.emb(input_ids)))
        return self.second(h.transpose(0, 1))


def test_unreadable_input_is_refused_and_the_advice_works():
    torch.manual_seed(0)
    model = SequenceFirst().eval()
    data = padded_batches(4, batch=3, seq=9)
    config = cfg(["first", "second"], r=2)
    with pytest.raises(eva.EvaError) as err:
        eva.get_eva_state_dict(model, data, config, show_progress_bar=False)
    msg = str(err.value)
    assert msg.startswith("layer second: its input of shape (9, 3, 12) does not fit")
    assert "prepare_layer_inputs_fn=eva.layer_input_rules({'second': fn})" in msg
    assert "every layer missing from it would use every token, padding included" in msg

    # the advice, followed: only `second` gets its own rule; `first` keeps the masked default
    def seq_first(layer_input, mask, name):
        return layer_input[0].transpose(0, 1)[mask]

    sd = eva.get_eva_state_dict(model, data, config, show_progress_bar=False,
                                prepare_layer_inputs_fn=eva.layer_input_rules({"second": seq_first}))

    def rows_of(name, x, mask):
        return x.transpose(0, 1)[mask] if name == "second" else x[mask]

    assert_layers_exact(sd, masked_truth(model, data, ["first", "second"], rows_of))
    kept = sum(int(b["attention_mask"].sum()) for b in data)
    assert sd.metadata["layers"]["first"]["tokens"] == kept


def test_plain_dict_keeps_peft_rule_for_missing_layers():
    """A plain dict is PEFT's mapping: the layers missing from it use every token (padding too)."""
    torch.manual_seed(0)
    model = SequenceFirst().eval()
    data = padded_batches(3)
    sd = eva.get_eva_state_dict(model, data, cfg(["first", "second"]), show_progress_bar=False,
                                prepare_layer_inputs_fn={"second": lambda li, m, n: li[0].transpose(0, 1)[m]})
    assert sd.metadata["layers"]["first"]["tokens"] == 3 * 3 * 9
