"""Token masks are never reinterpreted: bool masks, 0/1 integer masks and PEFT's ``mask.nonzero()``
index lists are told apart by dtype and values (and refused when ambiguous), tensor batches carry
no mask, and no loader shape ends in a raw IndexError."""
from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.eva import prepare_model_inputs_fn_language_modeling as peft_model_inputs

import eva
from eva.engine.masks import TokenMask
from helpers import assert_layers_exact, record_layer_calls
from model_state import batches, lora_config, run

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning")


def two_token_batches():
    """T = 2: an int64 (B, 2) attention mask has the shape of an (N, 2) index list."""
    data = batches(3, batch=4, seq=2, pad_last=0)
    for b in data:
        b["attention_mask"] = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0]])  # repeated rows: no index list
    return data


def truth_of(model, data, names, mask_of):
    calls = record_layer_calls(model, data, names)
    return {n: torch.cat([c[0][mask_of(b)] for b, c in zip(data, calls[n])]) for n in names}


def test_int_mask_of_two_tokens_is_read_as_a_mask(gpt2):
    data = two_token_batches()
    cfg = lora_config(["c_attn", "c_fc"], r=2, tau=1.0)
    sd = run(gpt2, data, cfg, prepare_model_inputs_fn=lambda b, c: b["attention_mask"])
    assert_layers_exact(sd, truth_of(gpt2, data, list(sd), lambda b: b["attention_mask"].bool()))
    assert all(info["tokens"] == 18 for info in sd.metadata["layers"].values())


def test_peft_index_list_is_read_as_an_index(gpt2):
    """PEFT's own model-input function (``mask.nonzero()``) keeps exactly the default's tokens."""
    data = two_token_batches()
    cfg = lora_config(["c_attn"], r=2, tau=1.0)
    ours = run(gpt2, data, cfg)
    theirs = run(gpt2, data, cfg, prepare_model_inputs_fn=peft_model_inputs)
    for name in ours:
        assert ours.metadata["layers"][name]["tokens"] == theirs.metadata["layers"][name]["tokens"] == 18
        torch.testing.assert_close(ours[name].abs(), theirs[name].abs(), atol=1e-5, rtol=0)


def test_ambiguous_int_mask_is_refused_and_the_fix_works(gpt2):
    """[[0, 1], [1, 1]] is a 0/1 mask and a sorted index list; the two keep different rows."""
    data = batches(2, batch=2, seq=2, pad_last=0)
    for b in data:
        b["attention_mask"] = torch.tensor([[0, 1], [1, 1]])
    cfg = lora_config(["c_attn"], r=1, tau=1.0)
    with pytest.raises(eva.EvaError, match=r"is ambiguous for an input of leading shape \(2, 2\).*keeps different "
                                           r"rows; return a bool \(batch, seq\) tensor"):
        run(gpt2, data, cfg, prepare_model_inputs_fn=lambda b, c: b["attention_mask"])
    sd = run(gpt2, data, cfg, prepare_model_inputs_fn=lambda b, c: b["attention_mask"].bool())
    assert_layers_exact(sd, truth_of(gpt2, data, list(sd), lambda b: b["attention_mask"].bool()))


def test_values_that_are_neither_mask_nor_index_are_refused(gpt2):
    data = batches(2)
    with pytest.raises(eva.EvaError, match=r"holding values other than 0 and 1.*not an index list.*return a bool"):
        run(gpt2, data, prepare_model_inputs_fn=lambda b, c: b["input_ids"])


@pytest.mark.parametrize("seq", [1, 2, 3])
def test_tensor_batches_of_any_length_use_every_token(gpt2, seq):
    """A plain tensor batch with prepare_model_inputs_fn=None carries no mask (it is the data)."""
    data = [b["input_ids"] for b in batches(3, batch=2, seq=seq, pad_last=0)]
    cfg = lora_config(["c_attn"], r=1, tau=1.0)
    sd = run(gpt2, data, cfg, forward_fn=lambda m, x: m(input_ids=x), prepare_model_inputs_fn=None)
    assert all(info["tokens"] == 3 * 2 * seq for info in sd.metadata["layers"].values())


def test_token_mask_readings():
    """The reader itself: bool, 0/1, index, both, neither."""
    m = TokenMask.read(torch.tensor([[True, False]]), "m")
    assert m.mask is not None and m.index is None
    m = TokenMask.read(torch.tensor([[1, 0, 1]]), "m")  # also one index of a 3-dim lead shape
    assert m.mask.dtype == torch.bool and m.index is not None
    mask, is_index = m.for_input((1, 3), lambda t: tuple(t.shape) == (1, 3), "layer")
    assert not is_index and mask.tolist() == [[True, False, True]]  # an index needs 3 leading dims
    m = TokenMask.read(torch.tensor([[0, 3], [1, 2]]), "m")
    assert m.mask is None and m.index is not None and m.index_extent == (2, 4)
    m = TokenMask.read(torch.tensor([[0, 1], [1, 1]]), "m")
    assert m.mask is not None and m.index is not None
    m = TokenMask.read(torch.tensor([[1, 1], [1, 1]]), "m")  # repeated rows: a mask only
    assert m.index is None
    m = TokenMask.read(torch.tensor([[1.0, 0.0]]), "m")  # floats are never indices
    assert m.index is None and m.mask.tolist() == [[True, False]]
    with pytest.raises(eva.EvaError, match="holding values other than 0 and 1"):
        TokenMask.read(torch.tensor([[2, 1], [1, 1]]), "m")
    # a batch's integer attention_mask: nonzero keeps, read on the device (packed sequence ids too)
    assert TokenMask.read(torch.tensor([[0, 5]]), "m", index_allowed=False).mask.tolist() == [[False, True]]
    with pytest.raises(eva.EvaError, match="holding values other than 0 and 1, so"):  # floats: checked
        TokenMask.read(torch.tensor([[0.0, -1e9]]), "m", index_allowed=False)
