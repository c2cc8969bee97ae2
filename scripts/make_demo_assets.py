"""Regenerate the demo's embedded model and sample data (run once; outputs are committed).

Usage: PYTHONPATH=. .venv/bin/python scripts/make_demo_assets.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from tests.models import train_digits_cnn

OUT = Path(__file__).resolve().parent.parent / "edgefleet" / "demo_assets"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        models = train_digits_cnn(Path(tmp))
        OUT.mkdir(parents=True, exist_ok=True)
        for path in (models.keras, models.tflite, models.onnx):
            (OUT / path.name).write_bytes(path.read_bytes())
        d = models.digits
        np.savez_compressed(OUT / "digits-sample.npz", x=d.x_test[:300], y=d.y_test[:300])
    print(f"wrote {sorted(p.name for p in OUT.iterdir())}")


if __name__ == "__main__":
    main()
