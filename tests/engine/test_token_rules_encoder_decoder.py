"""Encoder-decoder models: every layer takes the tokens of its own sequence.

Encoder layers take the encoder's attention mask; decoder self-attention and MLP layers take
``decoder_attention_mask`` (or every decoder token) AND the label mask; cross-attention keys and
values take the encoder output, hence the encoder mask. Checked against an independent float64
PCA of the right rows, from plain forwards with the masks applied by hand, for equal and unequal
encoder/decoder lengths, on T5 and BART.
"""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from helpers import assert_layers_exact, record_layer_calls

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning")


def t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval(), ["q", "k", "v", "o", "wi", "wo"], ("EncDecAttention.k",
                                                                                       "EncDecAttention.v")


def bart():
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
    return (BartForConditionalGeneration(cfg).eval(), ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
            ("encoder_attn.k_proj", "encoder_attn.v_proj"))


MODELS = {"t5": t5, "bart": bart}


def seq2seq_batches(n, enc_len, dec_len, decoder_mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 99, (3, enc_len), generator=g)
        am = torch.ones(3, enc_len, dtype=torch.long)
        am[0, -5:] = 0
        am[1, -2:] = 0
        labels = torch.randint(3, 99, (3, dec_len), generator=g)
        labels[2, -3:] = -100
        batch = {"input_ids": ids, "attention_mask": am, "labels": labels}
        if decoder_mask:
            dm = torch.ones(3, dec_len, dtype=torch.long)
            dm[1, -2:] = 0
            batch["decoder_attention_mask"] = dm
        out.append(batch)
    return out


def right_rows(model, batches, names, cross, use_label_mask):
    """What each layer should consume, from its recorded inputs and the masks applied by hand."""
    calls = record_layer_calls(model, batches, names)
    truth = {}
    for name in names:
        rows = []
        for batch, layer_calls in zip(batches, calls[name]):
            (x,) = layer_calls
            if name.startswith("encoder.") or name.startswith("model.encoder.") or name.endswith(cross):
                mask = batch["attention_mask"].bool()
            else:
                mask = batch.get("decoder_attention_mask", torch.ones_like(batch["labels"])).bool()
                if use_label_mask:
                    mask = mask & (batch["labels"] != -100)
            assert x.shape[:2] == mask.shape, (name, x.shape, mask.shape)
            rows.append(x[mask])
        truth[name] = torch.cat(rows)
    return truth


@pytest.mark.parametrize("use_label_mask", [True, False], ids=["labels", "no-labels"])
@pytest.mark.parametrize("decoder_mask", [True, False], ids=["dec-mask", "no-dec-mask"])
@pytest.mark.parametrize("lengths", [(12, 12), (12, 7)], ids=["equal", "unequal"])
@pytest.mark.parametrize("family", sorted(MODELS))
def test_each_layer_takes_its_own_sequence(family, lengths, decoder_mask, use_label_mask):
    model, targets, cross = MODELS[family]()
    data = seq2seq_batches(3, *lengths, decoder_mask=decoder_mask)
    cfg = LoraConfig(r=2, target_modules=targets, init_lora_weights="eva",
                     eva_config=EvaConfig(tau=1.0, use_label_mask=use_label_mask))
    sd = eva.get_eva_state_dict(model, data, cfg, show_progress_bar=False)
    truth = right_rows(model, data, list(sd), cross, use_label_mask)
    assert_layers_exact(sd, truth)
    # the two sequences really were told apart (the encoder and decoder masks keep different counts)
    enc = next(n for n in sd if ".encoder." in f".{n}" and n.endswith(targets[0]))
    dec = next(n for n in sd if ".decoder." in f".{n}" and n.endswith(targets[0]) and not n.endswith(cross))
    assert sd.metadata["layers"][enc]["tokens"] != sd.metadata["layers"][dec]["tokens"]


def test_cross_attention_keys_share_the_encoder_output(family="t5"):
    """Cross-attention k/v of every decoder block read the same encoder output: one group."""
    model, targets, cross = MODELS[family]()
    data = seq2seq_batches(2, 12, 7, decoder_mask=False)
    cfg = LoraConfig(r=2, target_modules=["k", "v"], init_lora_weights="eva", eva_config=EvaConfig(tau=1.0))
    sd = eva.get_eva_state_dict(model, data, cfg, show_progress_bar=False)
    groups = [g for g in sd.metadata["groups"] if any(m.endswith(cross) for m in g)]
    assert len(groups) == 1 and len(groups[0]) == 4


def test_one_user_mask_for_two_sequences_is_refused_and_the_fix_works():
    model, targets, cross = t5()
    data = seq2seq_batches(2, 12, 7, decoder_mask=False)
    cfg = LoraConfig(r=2, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(tau=1.0))
    with pytest.raises(eva.EvaError, match=r"returned one mask, but this encoder-decoder model has two token "
                                           r"sequences.*\{'encoder': mask or None, 'decoder': mask or None\}"):
        eva.get_eva_state_dict(model, data, cfg, show_progress_bar=False,
                               prepare_model_inputs_fn=lambda b, c: b["attention_mask"].bool())
    # the fix: a dict per sequence (None: every token of that sequence)
    sd = eva.get_eva_state_dict(model, data, cfg, show_progress_bar=False,
                                prepare_model_inputs_fn=lambda b, c: {"encoder": b["attention_mask"].bool(),
                                                                      "decoder": None})
    truth = right_rows(model, data, list(sd), cross, use_label_mask=False)
    assert_layers_exact(sd, truth)
