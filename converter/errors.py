"""The converter's branch of the error tree (root: ``agent.protocol.errors.EdgefleetError``)::

    EdgefleetError
    └── ConverterError
        ├── MissingExtraError       the [converter] extra is not installed
        ├── SourceModelError        the source model cannot be read
        ├── UnsupportedPathError    no conversion path for source, format and mode
        ├── DataError               calibration or evaluation data that does not fit the model
        ├── ConversionFailedError   a backend (TFLite converter, tf2onnx, ORT quantizer) failed
        ├── BudgetExceededError     the result breaks --max-drop; nothing was written
        └── TargetViolationError    the result does not fit a --target device profile
"""

from __future__ import annotations

from edgefleet.agent.protocol.errors import EdgefleetError

__all__ = ["BudgetExceededError", "ConversionFailedError", "ConverterError", "DataError",
           "MissingExtraError", "SourceModelError", "TargetViolationError",
           "UnsupportedPathError"]


class ConverterError(EdgefleetError):
    """Any failure of a conversion."""


class MissingExtraError(ConverterError):
    """A package of the [converter] extra is missing."""

    def __init__(self, package: str) -> None:
        super().__init__(f"{package} is not installed",
                         hint="pip install 'edgefleet[converter]'")


class SourceModelError(ConverterError):
    """The source model cannot be read."""


class UnsupportedPathError(ConverterError):
    """No conversion path for this source, target format and mode."""


class DataError(ConverterError):
    """Calibration or evaluation data that does not fit the model."""


class ConversionFailedError(ConverterError):
    """A conversion backend failed."""


class BudgetExceededError(ConverterError):
    """Every candidate broke the accuracy budget; nothing was written."""


class TargetViolationError(ConverterError):
    """The converted model does not fit a target device profile."""
