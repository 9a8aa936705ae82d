"""Module-name conventions the engine needs from the libraries around it (and nothing else)."""

#: The prefix a ``peft.PeftModel`` puts before the wrapped model's module names
#: (``base_model.model.layers.0...``); the engine accepts names with or without it.
PEFT_PREFIX = "base_model.model."
