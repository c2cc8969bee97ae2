"""What one conversion carries from stage to stage: its config, the source and data, the
report being filled, and the progress callback."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from edgefleet.agent.protocol.encryption import RecipientKey
from edgefleet.agent.protocol.signing import SigningKey
from edgefleet.agent.runtime.base import Array
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.data import Dataset
from edgefleet.converter.evaluate import OutputKind, Predict
from edgefleet.converter.report import ConversionReport
from edgefleet.converter.sources import SourceModel
from edgefleet.devices import DeviceProfile

__all__ = ["Context", "Step"]


class Step(Protocol):
    """Progress: a description, and how far along (``done`` of ``total``) when countable."""

    def __call__(self, text: str, done: int | None = None, total: int | None = None) -> None: ...


@dataclass
class Context:
    """One conversion's state, filled in as its stages run."""

    config: ConvertConfig
    source: SourceModel  # what is converted (the pruned model when pruning)
    calibration: Dataset | None
    evaluation: Dataset
    source_outputs: list[Array]
    profiles: list[DeviceProfile]
    report: ConversionReport
    step: Step
    key: SigningKey  # signs the bundle; loaded before any work, so a wrong key fails at once
    recipients: tuple[RecipientKey, ...] = ()
    reference: Predict | None = None  # what a result must not be slower than
    kinds: list[OutputKind] = field(default_factory=list)  # classifier or regression, why
    labelled: int = 0  # the output labels index (labelled_output)
    built: dict[str, bytes] = field(default_factory=dict)  # artifacts by attempt label
    quantized: str = ""  # why the source is quantized already (quantized_source), or ""
