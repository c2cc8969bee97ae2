"""The converter's errors, under :class:`ConverterError` (the whole tree is drawn in
docs/architecture.md, "Error tree")."""

from __future__ import annotations

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.converter.report import ConversionReport

__all__ = [
    "BudgetExceededError",
    "BundleWriteError",
    "ConversionFailedError",
    "ConverterError",
    "DataError",
    "MissingExtraError",
    "NoResultError",
    "OptionError",
    "SourceModelError",
    "TargetViolationError",
    "UnsupportedPathError",
]


class ConverterError(EdgefleetError):
    """Any failure of a conversion."""


class MissingExtraError(ConverterError):
    """A package of the [converter] extra is missing."""

    def __init__(self, package: str) -> None:
        super().__init__(f"{package} is not installed",
                         hint="pip install 'edgefleet[converter]'")


class OptionError(ConverterError):
    """An option value the converter does not take, or options that conflict; refused
    before anything is read."""


class BundleWriteError(ConverterError):
    """The bundle cannot be written where ``-o`` says: no permission, a read-only or full
    disk. Checked before converting; an earlier file there is kept."""


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


class NoResultError(ConverterError):
    """Every candidate was refused, so nothing was written: ``cause`` says why (over the
    budget, off the targets, or failed) and ``report`` shows each attempt."""

    def __init__(self, cause: ConverterError, report: ConversionReport) -> None:
        super().__init__(cause.message, hint=cause.hint)
        self.cause, self.report = cause, report
