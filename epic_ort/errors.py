"""The error model: every failure a user can cause or fix is an EpicOrtError.

The CLI turns these into one line on stderr and exit code 2; anything else is a bug and
keeps its traceback. Each message names the problem and, where there is one, the fix.
"""


class EpicOrtError(Exception):
    """Base of all errors a user can act on."""


class ModelLoadError(EpicOrtError):
    """A model folder is missing, incomplete, corrupt or inconsistent."""


class InvalidRequestError(EpicOrtError, ValueError):
    """A prompt or a setting cannot be served (empty prompt, too long, bad option)."""


class NumericalError(EpicOrtError):
    """The model produced NaN or infinite logits; sampling from them would be silent garbage."""


class CalibrationError(EpicOrtError):
    """A calibration file is missing, corrupt, or was made for another model or setting."""


class ExportError(EpicOrtError):
    """Export could not produce a model folder."""
