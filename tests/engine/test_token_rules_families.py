"""Families the other token-rule tests do not name: every layer of a random-weight model from a
transformers config takes exactly the tokens the attention mask (and the label mask) keeps, with
both padding sides, against an independent float64 PCA of the right rows. One-sequence models
here; encoder-decoder models in ``test_token_rules_encoder_decoder.py`` and below."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from peft import LoraConfig
from peft.tuners.lora.config import EvaConfig

import eva
from eva.engine.sequences import encoder_decoder_stacks
from helpers import assert_layers_exact, record_layer_calls

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning")

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=99)
GQA = dict(SMALL, num_key_value_heads=2)

DECODERS = {
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64)),
    "qwen2-sliding": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**GQA, use_sliding_window=True, sliding_window=4,
                                                                max_window_layers=1)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**GQA, head_dim=8, sliding_window=4)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**GQA, pad_token_id=0)),
    "gpt-neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**SMALL)),
    "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=99)),
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                           vocab_size=99)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                                                  num_attention_heads=4, max_position_embeddings=64,
                                                  word_embed_proj_dim=32)),
    "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**GQA, num_local_experts=4, num_experts_per_tok=2)),
    "albert": lambda: tf.AlbertModel(tf.AlbertConfig(vocab_size=99, embedding_size=16, hidden_size=32,
                                                     num_hidden_layers=3, num_attention_heads=4,
                                                     intermediate_size=48)),
    "distilbert": lambda: tf.DistilBertModel(tf.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4,
                                                                 hidden_dim=48)),
}

COMMON = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
              pad_token_id=1, decoder_start_token_id=2)
SEQ2SEQ = {
    "marian": lambda: tf.MarianMTModel(tf.MarianConfig(**COMMON)),
    "pegasus": lambda: tf.PegasusForConditionalGeneration(tf.PegasusConfig(**COMMON)),
    "m2m100": lambda: tf.M2M100ForConditionalGeneration(tf.M2M100Config(**COMMON)),
    "mt5": lambda: tf.MT5ForConditionalGeneration(tf.MT5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=48,
                                                               num_layers=2, num_heads=4, decoder_start_token_id=0)),
}


def padded(n=3, batch=3, seq=10, left=False, labels=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        am = torch.ones(batch, seq, dtype=torch.long)
        if left:
            am[0, :4] = 0
        else:
            am[0, -4:] = 0
            am[-1, -1:] = 0
        b = {"input_ids": torch.randint(3, 99, (batch, seq), generator=g), "attention_mask": am}
        if labels:
            lab = b["input_ids"].clone()
            lab[1, :3] = -100
            b["labels"] = lab
        out.append(b)
    return out


def run(model, data):
    cfg = LoraConfig(r=2, target_modules="all-linear", init_lora_weights="eva", eva_config=EvaConfig(tau=1.0))
    return eva.get_eva_state_dict(model, data, cfg, show_progress_bar=False)


def rows(x, mask):
    """The rows of one call kept by ``mask`` (B, T): by token, flattened, or one per sequence."""
    if x.dim() == 3:
        return x[mask]
    if x.shape[0] == mask.numel():
        return x[mask.reshape(-1)]
    assert x.shape[0] == mask.shape[0], x.shape
    return x[mask.any(1)]


@pytest.mark.parametrize("labels,left", [(False, False), (True, True)], ids=["right-pad", "left-pad+labels"])
@pytest.mark.parametrize("family", sorted(DECODERS))
def test_one_sequence_families(family, labels, left):
    torch.manual_seed(0)
    model = DECODERS[family]().eval()
    data = padded(labels=labels, left=left)
    if family in ("albert", "distilbert") and labels:
        for b in data:  # encoders: token labels as an MLM collator gives them
            b["labels"][0, 5:] = -100
    sd = run(model, data)
    calls = record_layer_calls(model, data, list(sd))
    truth = {}
    for n in sd:
        kept = []
        for b, layer_calls in zip(data, calls[n]):
            m = b["attention_mask"].bool()
            if labels:
                m = m & (b["labels"] != -100)
            kept += [rows(x, m) for x in layer_calls]
        truth[n] = torch.cat(kept)
    assert_layers_exact(sd, truth)


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_encoder_decoder_families(family):
    torch.manual_seed(0)
    model = SEQ2SEQ[family]().eval()
    data = []
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        am = torch.ones(3, 12, dtype=torch.long)
        am[0, -5:] = 0
        labels = torch.randint(3, 99, (3, 7), generator=g)
        labels[2, -3:] = -100
        dm = torch.ones(3, 7, dtype=torch.long)
        dm[1, -2:] = 0
        data.append({"input_ids": torch.randint(3, 99, (3, 12), generator=g), "attention_mask": am,
                     "labels": labels, "decoder_attention_mask": dm})
    sd = run(model, data)
    encoder, _ = encoder_decoder_stacks(model)
    in_encoder = {n for n, m in model.named_modules() if any(m is e for e in encoder.modules())}
    calls = record_layer_calls(model, data, list(sd))
    truth = {}
    for n in sd:
        cross = ("encoder_attn." in n or "EncDecAttention." in n) and n.endswith(("k_proj", "v_proj", ".k", ".v"))
        kept = []
        for b, (x,) in zip(data, calls[n]):
            if n in in_encoder or cross:
                m = b["attention_mask"].bool()
            else:
                m = b["decoder_attention_mask"].bool() & (b["labels"] != -100)
            kept.append(x[m])
        truth[n] = torch.cat(kept)
    assert_layers_exact(sd, truth)
