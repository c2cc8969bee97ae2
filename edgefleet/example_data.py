"""The demo's digits model and data, written out as files a newcomer can convert.

``edgefleet example-data DIR`` writes the Keras digits CNN that ``edgefleet demo`` uses
(8x8 grey digits, scaled 0-1), calibration samples and a labelled evaluation set, so the
README's walk-through runs from a fresh install with nothing else to fetch.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.protocol.errors import EdgefleetError

__all__ = ["CALIBRATION_SAMPLES", "ExampleDataExistsError", "write_example_data"]

ASSETS = Path(__file__).resolve().parent / "demo_assets"
CALIBRATION_SAMPLES = 100  # the first 100 digits calibrate; the other 200 evaluate
FILES = ("digits.keras", "calibration.npy", "eval.npz")


class ExampleDataExistsError(EdgefleetError):
    """A file the example data would write is already there; nothing was written."""


def write_example_data(out: Path) -> list[Path]:
    """Write digits.keras, calibration.npy and eval.npz into ``out``; return their paths."""
    targets = [out / name for name in FILES]
    taken = [str(path) for path in targets if path.exists()]
    if taken:
        raise ExampleDataExistsError(f"not overwriting {', '.join(taken)}: nothing was written",
                                     hint="choose an empty folder or remove those files")
    out.mkdir(parents=True, exist_ok=True)
    x, y = _sample()
    shutil.copyfile(ASSETS / "digits.keras", targets[0])
    np.save(targets[1], x[:CALIBRATION_SAMPLES])
    np.savez(targets[2], image=x[CALIBRATION_SAMPLES:], labels=y[CALIBRATION_SAMPLES:])
    return targets


def _sample() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    with np.load(ASSETS / "digits-sample.npz") as data:
        return data["x"], data["y"]
