"""Exceptions raised by the EVA engine. All derive from :class:`EvaError` (a ``ValueError``)."""


class EvaError(ValueError):
    """Bad input or a state the engine cannot continue from; the message names what and how to fix."""


class EvaTypeError(EvaError, TypeError):
    """A wrong type where PEFT raises ``TypeError`` (so ``except TypeError`` keeps working)."""


class EvaNotConvergedError(EvaError):
    """Data ran out (or ``max_steps`` was hit) before every needed component converged."""


class _StopForward(Exception):
    """Raised from a hook once every layer that still needs data has captured its input.

    The engine catches it: the rest of the forward pass is skipped (results are unchanged).
    """
