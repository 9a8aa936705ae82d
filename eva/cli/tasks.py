"""``eva init --task``: which transformers class the CLI calibrates, so its names are the ones
the user fine-tunes.

* ``causal-lm``: ``AutoModelForCausalLM``, PEFT ``task_type="CAUSAL_LM"``; all-linear leaves out
  the output layer (lm_head);
* ``seq-cls``: ``AutoModelForSequenceClassification``, ``task_type="SEQ_CLS"``; all-linear leaves
  out the classification head (``score`` / ``classifier``), which PEFT trains in full;
* ``seq2seq-lm``: ``AutoModelForSeq2SeqLM``, ``task_type="SEQ_2_SEQ_LM"``, for encoder-decoder
  models (T5, BART, ...): each line is both the source and the target (``labels``, padding set
  to -100), so the encoder and the decoder see the text; all-linear leaves out lm_head;
* ``base``: ``AutoModel``, no head (not for encoder-decoder models, whose base class needs decoder
  inputs).

``auto`` picks from the model's config: ``config.architectures`` ending in ``ForCausalLM`` /
``LMHeadModel`` -> causal-lm, ``ForSequenceClassification`` -> seq-cls; an encoder-decoder
config otherwise -> seq2seq-lm; a GGUF file (a llama.cpp language model, no ``architectures``) ->
causal-lm; anything else -> base.
Results load into any of the three either way (:mod:`eva.peft.names`); the task decides which
heads exist, and so what ``all-linear`` covers.
"""
from __future__ import annotations

from typing import Optional

from ..errors import EvaError

TASKS = ("causal-lm", "seq-cls", "seq2seq-lm", "base")
_CLASS_NAMES = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification",
                "seq2seq-lm": "AutoModelForSeq2SeqLM", "base": "AutoModel"}
_PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq-lm": "SEQ_2_SEQ_LM"}


def auto_task(config, gguf_file: Optional[str]) -> str:
    """The task ``--task auto`` means for this model config (see the module docstring)."""
    for arch in getattr(config, "architectures", None) or ():
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal-lm"
        if arch.endswith("ForSequenceClassification"):
            return "seq-cls"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq-lm"
    return "causal-lm" if gguf_file else "base"


def auto_class(task: str):
    """The transformers auto class of ``task`` (``AutoModelForCausalLM``, ...)."""
    import transformers
    return getattr(transformers, _CLASS_NAMES[task])


def peft_task_type(task: str) -> Optional[str]:
    """PEFT's ``LoraConfig.task_type`` for ``task`` (None for base)."""
    return _PEFT_TASK_TYPES.get(task)


def resolve_task(task: str, config, gguf_file: Optional[str], model_path: str) -> str:
    """``--task`` checked against the model: ``auto`` resolved; a class transformers has no
    mapping for (e.g. ``--task causal-lm`` on T5) is one line naming the tasks that work."""
    chosen = auto_task(config, gguf_file) if task == "auto" else task
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    usable = [t for t in TASKS if (t != "base" or not encoder_decoder)
              and (t == "base" or type(config) in getattr(auto_class(t), "_model_mapping", {}))]
    if chosen == "base" and encoder_decoder:
        raise EvaError(f"--task base: --model {model_path!r} is an encoder-decoder model (model_type "
                       f"{getattr(config, 'model_type', '?')!r}), whose base class needs decoder inputs that eva init "
                       f"does not make; use --task {' or --task '.join(usable)}")
    mapping = getattr(auto_class(chosen), "_model_mapping", None)
    if chosen != "base" and mapping is not None and type(config) not in mapping:
        raise EvaError(f"--task {chosen}: transformers has no {_CLASS_NAMES[chosen]} class for --model "
                       f"{model_path!r} (model_type {getattr(config, 'model_type', '?')!r}); use --task "
                       f"{' or --task '.join(usable)}")
    return chosen
