"""Data that cannot feed EVA: clear errors, and the model left exactly as it was.

Empty loaders, batches whose every token is padding (an error, or skipped with a warning under
``skip_empty_batches=True``), labels that mask every token (and ``use_label_mask``), fewer
tokens than components, and batches that are not dicts of ``input_ids`` / ``attention_mask``.
After each failure (and success) the hooks and train/eval flags are restored (``model_state``).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from eva import EvaError
from model_state import D, assert_restored, batches, lora_config, run, snapshot, untouched

pytestmark = pytest.mark.filterwarnings("ignore:EVA stopped:UserWarning", "ignore:lora with eva initialization")


# ----------------------------------------------------------------------- empty data ---------
def test_empty_list_loader(gpt2):
    # mode_calls=False: checked inside the run (model.eval() already called), restored
    with untouched(gpt2, mode_calls=False) as spy, \
            pytest.raises(EvaError, match="dataloader is empty.*at least one batch"):
        run(gpt2, [], forward_fn=spy.forward_fn)


def test_generator_that_yields_nothing(gpt2):
    before = snapshot(gpt2)
    with pytest.raises(EvaError, match="yielded no batch"):
        run(gpt2, (b for b in []))
    assert_restored(gpt2, before)


def _with_empty_batch(index, n=4):
    data = batches(n)
    data[index]["attention_mask"][:] = 0
    return data


def test_all_padding_batch_raises(gpt2):
    before = snapshot(gpt2)
    with pytest.raises(EvaError, match=r"batch 1 keeps no token.*skip_empty_batches=True"):
        run(gpt2, _with_empty_batch(1))
    assert_restored(gpt2, before)


@pytest.mark.parametrize("index", [0, 1])
def test_all_padding_batch_skipped_with_warning(gpt2, index):
    data = _with_empty_batch(index)
    before = snapshot(gpt2)
    with pytest.warns(UserWarning, match=rf"skipping batch {index}"):
        sd = run(gpt2, data, lora_config(["c_attn"], tau=1.0), skip_empty_batches=True)
    assert_restored(gpt2, before)
    kept = sum(int(b["attention_mask"].sum()) for b in data)
    assert set(sd) == {"h.0.attn.c_attn", "h.1.attn.c_attn"}
    assert all(info["tokens"] == kept and info["steps"] == 3 for info in sd.metadata["layers"].values())


@pytest.mark.parametrize("max_steps", [None, 1])
def test_every_batch_skipped_raises_eva_error(gpt2_train, max_steps):
    data = batches(2)
    for b in data:
        b["attention_mask"][:] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(EvaError, match="no token"):
            run(gpt2_train, data, skip_empty_batches=True, max_steps=max_steps)


def test_every_batch_skipped_leaves_model_clean(gpt2):
    data = batches(2)
    for b in data:
        b["attention_mask"][:] = 0
    before = snapshot(gpt2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(Exception):  # EvaError once the bug above is fixed (KeyError today)
            run(gpt2, data, skip_empty_batches=True)
    assert_restored(gpt2, before)


# ---------------------------------------------------------------------------- labels -------
def _labelled(data, fill=-100):
    for b in data:
        b["labels"] = torch.full_like(b["input_ids"], fill)
    return data


def _forward_without_labels(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def test_labels_all_ignored_masks_every_token(gpt2):
    before = snapshot(gpt2)
    with pytest.raises(EvaError, match=r"batch 0 keeps no token.*use_label_mask=False"):
        run(gpt2, _labelled(batches(3)), forward_fn=_forward_without_labels)
    assert_restored(gpt2, before)


def test_labels_ignored_when_label_mask_is_off(gpt2_train):
    data = _labelled(batches(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sd = run(gpt2_train, data, lora_config(["c_attn"], tau=1.0, use_label_mask=False),
                 forward_fn=_forward_without_labels)
    kept = sum(int(b["attention_mask"].sum()) for b in data)
    assert all(info["tokens"] == kept for info in sd.metadata["layers"].values())


def test_label_mask_keeps_only_labelled_tokens(gpt2_train):
    data = batches(3)
    for b in data:
        labels = b["input_ids"].clone()
        labels[:, :5] = -100  # e.g. the prompt
        b["labels"] = labels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sd = run(gpt2_train, data, lora_config(["c_attn"], tau=1.0), forward_fn=_forward_without_labels)
    kept = sum(int((b["attention_mask"].bool() & (b["labels"] != -100)).sum()) for b in data)
    assert all(info["tokens"] == kept for info in sd.metadata["layers"].values())


# ------------------------------------------------------------------- too little data --------
def test_fewer_tokens_than_components(gpt2):
    before = snapshot(gpt2)
    tiny = [{"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(EvaError, match=r"layer h\.\d\.attn\.c_attn .*saw only 3 token\(s\).*more data or lower r"):
            run(gpt2, tiny, lora_config(["c_attn"], r=8))
    assert_restored(gpt2, before)


# ---------------------------------------------------------------------- batch format -------
def test_non_dict_batches_need_own_model_inputs_fn(gpt2):
    before = snapshot(gpt2)
    data = [b["input_ids"] for b in batches(2)]
    with pytest.raises(TypeError, match=r"^When using `prepare_model_inputs_fn_language_modeling` inputs must be a "
                                        r"dictionary.*forward_fn.*prepare_model_inputs_fn=None to use every token"):
        run(gpt2, data, forward_fn=lambda m, x: m(input_ids=x))
    assert_restored(gpt2, before)
    # the advice, followed: a tensor batch carries no mask, so every token is used
    sd = run(gpt2, data, forward_fn=lambda m, x: m(input_ids=x), prepare_model_inputs_fn=None)
    assert all(info["tokens"] == 2 * 3 * 17 for info in sd.metadata["layers"].values())
    assert_restored(gpt2, before)


def test_tuple_batches_follow_the_advice(gpt2):
    """(input_ids, attention_mask) tuples: each of the message's fixes, followed, runs as it says."""
    data = [(b["input_ids"], b["attention_mask"]) for b in batches(3)]

    def forward(model, batch):  # the message's example
        return model(input_ids=batch[0], attention_mask=batch[1])

    with pytest.raises(TypeError, match=r"inputs must be a dictionary; got tuple batches.*lambda model, batch: "
                                        r"model\(input_ids=batch\[0\], attention_mask=batch\[1\]\).*lambda batch, "
                                        r"cfg: batch\[1\]\.bool\(\)"):
        run(gpt2, data, forward_fn=forward)
    kept = sum(int(m.sum()) for _, m in data)
    sd = run(gpt2, data, forward_fn=forward, prepare_model_inputs_fn=lambda batch, cfg: batch[1].bool())
    assert all(info["tokens"] == kept for info in sd.metadata["layers"].values())
    sd = run(gpt2, data, forward_fn=forward, prepare_model_inputs_fn=None)
    assert all(info["tokens"] == 3 * 3 * 17 for info in sd.metadata["layers"].values())


def test_batch_without_a_mask_uses_every_token(gpt2, token_spy):
    """inputs_embeds without attention_mask (and pixel values, audio features): no mask, every
    token, with the default input functions and with prepare_layer_inputs_fn=None alike."""
    before = snapshot(gpt2)
    torch.manual_seed(0)
    data = [{"inputs_embeds": torch.randn(2, 5, D)} for _ in range(3)]
    sd = run(gpt2, data, observers=[token_spy])
    assert all(info["tokens"] == 30 for info in sd.metadata["layers"].values())
    assert all(sum(r.shape[0] for r in rows) == 30 for rows in token_spy.values())
    sd = run(gpt2, data, prepare_layer_inputs_fn=None)
    assert all(info["tokens"] == 30 for info in sd.metadata["layers"].values())
    assert_restored(gpt2, before)


def test_batches_of_lists_get_a_one_line_error(gpt2):
    """A tokenizer called without return_tensors gives lists: one line naming the key and the fix."""
    data = [{"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]]}]
    with pytest.raises(EvaError, match=r"^the batch's 'attention_mask' is a list, not a tensor.*return_tensors='pt'"):
        run(gpt2, data)
