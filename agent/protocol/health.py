"""``health.npz``: inputs the device runs after staging, the outputs expected, tolerances.

Keys: ``input/<name>`` and ``output/<name>`` arrays (batch first), and 0-d
``atol`` and ``rtol``. A device passes when every output is within
``atol + rtol * |expected|`` of what the converter measured on the host.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.protocol.errors import BundleFormatError

__all__ = ["HealthData"]

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class HealthData:
    inputs: dict[str, Array]
    outputs: dict[str, Array]
    atol: float = 1e-3
    rtol: float = 1e-3
    extras: dict[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        arrays: dict[str, Array] = {f"input/{k}": v for k, v in self.inputs.items()}
        arrays.update({f"output/{k}": v for k, v in self.outputs.items()})
        arrays["atol"] = np.asarray(self.atol, dtype=np.float64)
        arrays["rtol"] = np.asarray(self.rtol, dtype=np.float64)
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes) -> HealthData:
        try:
            with np.load(io.BytesIO(raw), allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise BundleFormatError(f"health.npz is unreadable: {exc}",
                                    hint="rebuild the bundle with 'edgefleet convert'") from exc
        inputs = {k.removeprefix("input/"): v for k, v in arrays.items() if k.startswith("input/")}
        outputs = {k.removeprefix("output/"): v for k, v in arrays.items()
                   if k.startswith("output/")}
        if not inputs or not outputs:
            raise BundleFormatError("health.npz holds no inputs or no expected outputs",
                                    hint="rebuild the bundle with 'edgefleet convert'")
        return cls(inputs, outputs, float(arrays.get("atol", 1e-3)),
                   float(arrays.get("rtol", 1e-3)))
