"""Errors that the CLI turns into a one-line message and a non-zero exit."""

__all__ = ["QCompileError", "InputModelError", "CalibrationDataError", "NothingToQuantizeError", "OutputPathError"]


class QCompileError(Exception):
    """Base class: anything the user can fix by changing what they passed in."""


class InputModelError(QCompileError):
    """The model file is missing, not ONNX, or structurally unusable."""


class CalibrationDataError(QCompileError):
    """Calibration arrays do not match the model's inputs (names, shapes, dtypes) or hold NaN/Inf."""


class NothingToQuantizeError(QCompileError):
    """The recipe selects no operator of the model."""


class OutputPathError(QCompileError):
    """The output path equals the input, or cannot be written."""
