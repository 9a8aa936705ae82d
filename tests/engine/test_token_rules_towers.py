"""Towers, frames and inputs without a token mask.

* No mask means every token (ViT's patches).
* A batch's mask applies to the tower that receives the batch's tokens, never to another tower
  whose positions happen to have the same shape (CLIP with T = patches + 1).
* A mask at another resolution is converted the way the model converts it (wav2vec2's frames), a
  tower the mask never reaches uses every position (Whisper's encoder ignores its attention_mask),
  and a model without a rule is refused with a fix that works when followed.
"""
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


def run(model, data, targets, **kw):
    return eva.get_eva_state_dict(model, data, cfg(targets), show_progress_bar=False, **kw)


def truth_of(model, data, names, mask_of):
    """Recorded inputs of each layer (one call per forward), kept by ``mask_of(name, batch, x)``
    (a bool mask of x's leading shape, or None for every row)."""
    calls = record_layer_calls(model, data, names)
    out = {}
    for n in names:
        rows = []
        for b, (x,) in zip(data, calls[n]):
            m = mask_of(n, b, x)
            rows.append(x.reshape(-1, x.shape[-1]) if m is None else x[m])
        out[n] = torch.cat(rows)
    return out


def test_vision_model_without_mask_uses_every_patch():
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                               image_size=16, patch_size=4)).eval()
    data = [{"pixel_values": torch.randn(2, 3, 16, 16)} for _ in range(3)]
    sd = run(model, data, "all-linear")
    assert_layers_exact(sd, truth_of(model, data, list(sd), lambda n, b, x: None))
    assert sd.metadata["layers"]["layers.0.mlp.fc1"]["tokens"] == 3 * 2 * 17


@pytest.mark.parametrize("seq", [9, 17], ids=["T=9", "T=patches+1"])
def test_the_text_mask_never_reaches_the_vision_tower(seq):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                         vocab_size=99, max_position_embeddings=32),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                           image_size=16, patch_size=4), projection_dim=16)).eval()
    data = []
    for _ in range(3):
        am = torch.ones(2, seq, dtype=torch.long)
        am[0, -3:] = 0
        data.append({"input_ids": torch.randint(1, 99, (2, seq)), "attention_mask": am,
                     "pixel_values": torch.randn(2, 3, 16, 16)})
    sd = run(model, data, ["q_proj", "fc1"])

    def mask_of(name, batch, x):
        return batch["attention_mask"].bool() if name.startswith("text_model.") else None

    assert_layers_exact(sd, truth_of(model, data, list(sd), mask_of))
    assert sd.metadata["layers"]["vision_model.encoder.layers.0.mlp.fc1"]["tokens"] == 3 * 2 * 17


def test_whisper_encoder_uses_every_frame_it_computes_on():
    """Whisper's encoder is never given the feature-level attention_mask: every frame is real
    input to it. The decoder takes its own tokens."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=99, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_source_positions=20,
        max_target_positions=32, decoder_start_token_id=1, pad_token_id=0)).eval()
    data = []
    for _ in range(3):
        am = torch.ones(2, 40, dtype=torch.long)
        am[0, -10:] = 0
        data.append({"input_features": torch.randn(2, 8, 40), "attention_mask": am,
                     "decoder_input_ids": torch.randint(2, 99, (2, 5))})
    sd = run(model, data, ["q_proj", "k_proj", "fc1"])
    assert_layers_exact(sd, truth_of(model, data, list(sd), lambda n, b, x: None))
    assert sd.metadata["layers"]["model.encoder.layers.0.fc1"]["tokens"] == 3 * 2 * 20
    assert sd.metadata["layers"]["model.decoder.layers.0.encoder_attn.k_proj"]["tokens"] == 3 * 2 * 20
    assert sd.metadata["layers"]["model.decoder.layers.0.fc1"]["tokens"] == 3 * 2 * 5


def test_audio_mask_is_converted_to_frames_as_the_model_does():
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    torch.manual_seed(0)
    model = Wav2Vec2Model(Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2, num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True)).eval()
    data = []
    for _ in range(3):
        am = torch.ones(2, 400, dtype=torch.long)
        am[0, -150:] = 0
        data.append({"input_values": torch.randn(2, 400), "attention_mask": am})
    sd = run(model, data, ["q_proj", "intermediate_dense"])

    def frames(name, batch, x):
        return model._get_feature_vector_attention_mask(x.shape[1], batch["attention_mask"]).bool()

    assert_layers_exact(sd, truth_of(model, data, list(sd), frames))
    assert sd.metadata["layers"]["encoder.layers.0.attention.q_proj"]["tokens"] == 3 * (39 + 24)


class Downsampler(nn.Module):
    """``coarse`` sees every second position: a resolution the model has no mask rule for."""

    def __init__(self, vocab=50, d=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fine = nn.Linear(d, d)
        self.coarse = nn.Linear(d, d)

    def forward(self, input_ids, attention_mask=None):
        h = torch.tanh(self.fine(self.emb(input_ids)))
        return self.coarse(h[:, ::2])


def test_another_resolution_without_a_rule_is_refused_and_each_fix_works():
    torch.manual_seed(0)
    model = Downsampler().eval()
    data = []
    for _ in range(4):
        am = torch.ones(3, 10, dtype=torch.long)
        am[0, -4:] = 0
        data.append({"input_ids": torch.randint(0, 50, (3, 10)), "attention_mask": am})
    with pytest.raises(eva.EvaError) as err:
        run(model, data, ["fine", "coarse"])
    msg = str(err.value)
    assert msg.startswith("layer coarse: its input has 5 positions per sequence (shape (3, 5, 10)) but the batch's "
                          "input mask has 10")
    assert "leave attention_mask out of the batch" in msg and "eva.layer_input_rules({'coarse': fn})" in msg

    # fix 1: a rule of its own for `coarse` (here: a position is kept when its source token is)
    sd = run(model, data, ["fine", "coarse"],
             prepare_layer_inputs_fn=eva.layer_input_rules({"coarse": lambda li, m, n: li[0][m[:, ::2]]}))

    def mask_of(name, batch, x):
        m = batch["attention_mask"].bool()
        return m[:, ::2] if name == "coarse" else m

    assert_layers_exact(sd, truth_of(model, data, ["fine", "coarse"], mask_of))
    # fix 2: no attention_mask in the batch: every position of every layer
    bare = [{"input_ids": b["input_ids"]} for b in data]
    sd = run(model, bare, ["fine", "coarse"])
    assert_layers_exact(sd, truth_of(model, bare, ["fine", "coarse"], lambda n, b, x: None))


def test_integer_extras_passed_down_by_kwargs_decide_nothing():
    """BERT hands unknown batch keys (labels, special_tokens_mask) down to its attention modules
    through **kwargs: they must not make the attention look like a tower the mask never reaches."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=48)).eval()
    data = []
    for _ in range(3):
        am = torch.ones(3, 10, dtype=torch.long)
        am[0, :4] = 0
        ids = torch.randint(3, 99, (3, 10))
        labels = ids.clone()
        labels[1, :3] = -100
        data.append({"input_ids": ids, "attention_mask": am, "labels": labels,
                     "special_tokens_mask": torch.zeros(3, 10, dtype=torch.long)})
    sd = run(model, data, ["query", "dense"])

    def mask_of(name, batch, x):
        m = batch["attention_mask"].bool() & (batch["labels"] != -100)
        return m.any(1) if x.dim() == 2 else m

    assert_layers_exact(sd, truth_of(model, data, list(sd), mask_of))
