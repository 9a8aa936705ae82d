"""Which token sequence each call of a target layer belongs to, decided from the model's structure.

**Sequences.** A decoder-only or encoder-only model has one token sequence, ``"input"``. An
encoder-decoder model (``config.is_encoder_decoder`` with distinct ``get_encoder()`` and
``get_decoder()`` stacks: T5, BART, Marian, Whisper, ...) has two:

* layers inside the encoder stack take ``"encoder"``;
* layers inside the decoder stack take ``"decoder"``, except calls whose input *is* the encoder
  output handed to the decoder (the very tensor, found by identity: cross-attention keys and
  values), which take ``"encoder"``;
* layers outside both stacks (an LM head, a classification head) take ``"decoder"``.

**Where a batch's mask reaches.** A mask read from the batch (its ``attention_mask``) belongs to
the token tensors beside it (``input_ids``, ``inputs_embeds``). A tower fed other inputs (a vision
tower fed ``pixel_values``, Whisper's encoder fed ``input_features`` only) does not compute on that
sequence, so the mask does not apply to it: its layers use every row. The first forward records,
for every module above a target, which batch tensors it received (by identity); a layer's tower
is its innermost such module that received a *deciding* tensor: a token tensor of the sequence
(:data:`SEQUENCE_KEYS`) or a floating-point model input (pixels, audio, features). Integer
extras that models pass down through ``**kwargs`` (``labels``, ``special_tokens_mask``) decide
nothing (:meth:`reached`). Masks a ``prepare_model_inputs_fn`` returns are the user's rule and
apply as given.

**Another resolution.** A mask of (B, T) for inputs of (B, T', d) (audio samples against
frames) is converted as the model converts it (:meth:`convert_resolution`): with the model's
``_get_feature_vector_attention_mask`` (wav2vec2-style models) or, for right-padded masks, its
``_get_feat_extract_output_lengths``; otherwise it is refused with the fix.

Everything is decided on the first forward (:meth:`begin_discovery` .. :meth:`end_discovery`);
later forwards look the decisions up by call index.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .groups import view_key

#: Batch keys that carry the main (or encoder) token sequence.
SEQUENCE_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "token_type_ids", "position_ids")
#: Batch keys of the decoder sequence of an encoder-decoder model.
DECODER_KEYS = ("decoder_input_ids", "decoder_inputs_embeds", "decoder_attention_mask", "labels")


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (else ``model``)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and hasattr(model, "peft_config") else model


def encoder_decoder_stacks(model: nn.Module) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """``(encoder, decoder)`` of an encoder-decoder transformers model, else ``(None, None)``."""
    inner = unwrapped(model)
    config = getattr(inner, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None, None
    try:
        enc, dec = inner.get_encoder(), inner.get_decoder()
    except Exception:  # a model without the lookups: one sequence
        return None, None
    if not isinstance(enc, nn.Module) or not isinstance(dec, nn.Module) or enc is dec or inner in (enc, dec):
        return None, None
    return enc, dec


def _tensor_ids(args: tuple, kwargs: dict) -> List[int]:
    """ids of the tensors passed directly (not nested) to a call."""
    return [id(a) for a in args if isinstance(a, Tensor)] + [id(v) for v in kwargs.values() if isinstance(v, Tensor)]


def _context_argument(module: nn.Module, args: tuple, kwargs: dict) -> Optional[Tensor]:
    """The ``encoder_hidden_states`` argument of a decoder stack's call, if any."""
    if isinstance(kwargs.get("encoder_hidden_states"), Tensor):
        return kwargs["encoder_hidden_states"]
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return None
    v = bound.get("encoder_hidden_states")
    return v if isinstance(v, Tensor) else None


class SequenceLayout:
    """The sequences of a model and, per target layer and call, the sequence its input belongs to.

    Args:
        model: the model the engine runs (a ``PeftModel`` is looked through).
        targets: the run's :class:`eva.peft.targets.Target` list.
    """

    def __init__(self, model: nn.Module, targets: List[Any]):
        self.model = model
        self.encoder, self.decoder = encoder_decoder_stacks(model)
        self.sequences: Tuple[str, ...] = ("encoder", "decoder") if self.encoder is not None else ("input",)
        self.by_name: Dict[str, nn.Module] = dict(model.named_modules())
        self.names = {id(m): n for n, m in self.by_name.items()}
        self._targets = {t.name: t for t in targets}
        enc_ids = {id(m) for m in self.encoder.modules()} if self.encoder is not None else set()
        self.stack: Dict[str, str] = {}
        for t in targets:
            if self.encoder is None:
                self.stack[t.name] = "input"
            else:
                self.stack[t.name] = "encoder" if id(t.module) in enc_ids else "decoder"
        self.calls: Dict[str, List[str]] = {}          # target -> sequence of each call of a forward
        self.received: Dict[int, set] = {}             # module id -> deciding batch keys it received (first forward)
        self._context: set = set()                     # view keys of the encoder output (first forward)
        self._batch_ids: Dict[int, str] = {}
        self._handles: list = []
        self._reached: Dict[Tuple[str, str], bool] = {}
        self._converter = self._find_converter()

    @property
    def encoder_decoder(self) -> bool:
        return self.encoder is not None

    # ------------------------------------------------------------------ discovery ------------
    def begin_discovery(self, batch) -> None:
        """Hooks for the first forward: batch tensors received per module, the encoder output."""
        self.end_discovery()
        self.calls.clear()
        self.received.clear()
        self._reached.clear()
        self._batch_ids = {}
        if isinstance(batch, Mapping):
            self._batch_ids = {id(v): k for k, v in batch.items() if isinstance(v, Tensor)
                               and (k in SEQUENCE_KEYS or v.is_floating_point())}
        watched = self._ancestors_of_targets()
        for m in watched:
            self._handles.append(m.register_forward_pre_hook(self._recorder(m), with_kwargs=True))
        if self.encoder is not None:
            self._handles.append(self.encoder.register_forward_hook(self._encoder_output))
            self._handles.append(self.decoder.register_forward_pre_hook(self._decoder_input, with_kwargs=True))

    def end_discovery(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._context = set()
        self._batch_ids = {}

    def _ancestors_of_targets(self) -> List[nn.Module]:
        out, seen = [], set()
        for name in self._targets:
            parts = name.split(".")
            for i in range(len(parts), -1, -1):
                m = self.by_name.get(".".join(parts[:i]))
                if m is not None and id(m) not in seen:
                    seen.add(id(m))
                    out.append(m)
        return out

    def _recorder(self, module: nn.Module):
        def hook(mod, args, kwargs):
            keys = {self._batch_ids[i] for i in _tensor_ids(args, kwargs) if i in self._batch_ids}
            if keys:
                self.received.setdefault(id(module), set()).update(keys)
        return hook

    def _encoder_output(self, module, args, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
        if isinstance(out, Tensor):
            key = view_key(out, 0)
            if key is not None:
                self._context.add(key)

    def _decoder_input(self, module, args, kwargs) -> None:
        ctx = _context_argument(module, args, kwargs)
        if ctx is not None:
            key = view_key(ctx, 0)
            if key is not None:
                self._context.add(key)

    def record_call(self, name: str, raw: Optional[Tensor]) -> str:
        """During the first forward: the sequence of this call of ``name`` (recorded for later)."""
        seq = self.stack[name]
        if seq == "decoder" and raw is not None and view_key(raw, 0) in self._context:
            seq = "encoder"
        self.calls.setdefault(name, []).append(seq)
        return seq

    # ------------------------------------------------------------------ lookups --------------
    def sequence(self, name: str, call: int) -> str:
        """The sequence of call ``call`` (0-based, within one forward) of target ``name``."""
        seqs = self.calls.get(name)
        if not seqs:
            return self.stack[name]
        return seqs[call % len(seqs)]

    def reached(self, name: str, sequence: str) -> bool:
        """Whether a mask read from the batch applies to ``name``'s input of ``sequence``: False
        when the layer's tower (:meth:`tower`) received none of the sequence's token tensors.
        The decoder sequence is always reached."""
        if sequence == "decoder":
            return True
        key = (name, sequence)
        if key not in self._reached:
            module = self.encoder if (sequence == "encoder" and self.stack.get(name) == "decoder") \
                else self._targets[name].module
            found = self.tower(module)
            self._reached[key] = found is None or any(k in SEQUENCE_KEYS for k in self.received[id(found[1])])
        return self._reached[key]

    def tower(self, module: nn.Module) -> Optional[Tuple[str, nn.Module]]:
        """``(name, module)`` of the innermost module at or above ``module`` that received batch
        tensors in the first forward (None: none did, or the module is not in the model)."""
        name = self.names.get(id(module))
        if name is None:
            return None
        parts = name.split(".") if name else []
        for i in range(len(parts), -1, -1):
            prefix = ".".join(parts[:i])
            m = self.by_name.get(prefix)
            if m is not None and id(m) in self.received:
                return prefix, m
        return None

    # ------------------------------------------------------------------ resolution -----------
    def _find_converter(self):
        inner = unwrapped(self.model)
        for m in [inner] + list(inner.modules()):
            fn = getattr(m, "_get_feature_vector_attention_mask", None)
            if callable(fn):
                return ("feature_vector_mask", fn)
        for m in [inner] + list(inner.modules()):
            fn = getattr(m, "_get_feat_extract_output_lengths", None)
            if callable(fn):
                return ("output_lengths", fn)
        return None

    def convert_resolution(self, mask: Tensor, positions: int) -> Optional[Tensor]:
        """A bool (B, T) mask converted to (B, ``positions``) the way the model converts its
        attention mask, or None when the model has no such rule (or the mask does not suit it)."""
        if self._converter is None or mask.dim() != 2:
            return None
        kind, fn = self._converter
        try:
            if kind == "feature_vector_mask":
                out = fn(positions, mask.to(torch.long))
            else:
                lengths = mask.sum(-1)
                ar = torch.arange(mask.shape[1], device=mask.device)
                if not torch.equal(mask, ar[None, :] < lengths[:, None]):
                    return None  # not right-padded: lengths do not describe it
                out_len = torch.as_tensor(fn(lengths), device=mask.device)
                out = torch.arange(positions, device=mask.device)[None, :] < out_len.reshape(-1, 1)
        except Exception:
            return None
        out = torch.as_tensor(out).to(torch.bool)
        return out if tuple(out.shape) == (mask.shape[0], positions) else None
