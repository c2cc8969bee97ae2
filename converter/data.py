"""Calibration and evaluation data: ``.npy``, ``.npz`` or a folder of images.

- ``.npy``: one array, samples × the model's input shape (single-input models).
- ``.npz``: one array per input name (a lone array feeds a single-input model);
  ``labels`` holds class indices for evaluation.
- a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``): resized to the
  model's input, laid out NHWC or NCHW as the model's input shape says, scaled
  by ``--scale`` (default ``0-1``); images in sub-folders are labelled by the
  sub-folder's index in sorted order. A dynamic height or width becomes 224. Images
  are turned as their EXIF orientation says, 16-bit samples are scaled to 8 bits, and
  transparent images are composited on black (for 1 or 3 channels).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.runtime.base import Array, TensorInfo
from edgefleet.converter.config import Scale
from edgefleet.converter.errors import DataError

__all__ = ["DYNAMIC_SIDE", "IMAGE_SUFFIXES", "Dataset", "load_dataset"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
DYNAMIC_SIDE = 224  # images for inputs with a dynamic height or width are resized to this
_SCALES = {"0-1": (1 / 255.0, 0.0), "-1-1": (2 / 255.0, -1.0), "0-255": (1.0, 0.0)}


@dataclass(frozen=True)
class Dataset:
    """Inputs by name (samples first) and optional integer labels."""

    inputs: dict[str, Array]
    labels: Array | None = None

    def __len__(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def take(self, count: int) -> Dataset:
        labels = self.labels[:count] if self.labels is not None else None
        return Dataset({k: v[:count] for k, v in self.inputs.items()}, labels)

    def batches(self, size: int) -> Iterator[dict[str, Array]]:
        for start in range(0, len(self), size):
            yield {k: v[start:start + size] for k, v in self.inputs.items()}


def load_dataset(path: Path, inputs: list[TensorInfo], scale: Scale = "0-1") -> Dataset:
    if not path.exists():
        raise DataError(f"data {path} does not exist", hint="check the path")
    if path.is_dir():
        data = _images(path, inputs, scale)
    elif path.suffix == ".npy":
        data = Dataset({_single(inputs, path).name: np.load(path, allow_pickle=False)})
    elif path.suffix == ".npz":
        data = _npz(path, inputs)
    else:
        raise DataError(f"cannot read {path.name}",
                        hint="use .npy, .npz (arrays by input name, 'labels') or an image folder")
    fitted = {i.name: _finite(_fit(i, data.inputs[i.name], path), i.name, path,
                              data.inputs[i.name])
              for i in inputs}
    return Dataset(fitted, _checked_labels(data.labels, len(next(iter(fitted.values()))), path))


def _checked_labels(labels: Array | None, samples: int, path: Path) -> Array | None:
    """Labels are one class index a sample: integers, as many as the samples."""
    if labels is None:
        return None
    if labels.ndim != 1 or len(labels) != samples:
        raise DataError(f"{path.name}: 'labels' has shape {list(labels.shape)} for {samples} "
                        "samples", hint="give one class index a sample, as a 1-D array")
    if labels.dtype.kind not in "iu":
        whole = labels.dtype.kind == "f" and bool(np.all(np.isfinite(labels))) and \
            bool(np.all(labels == np.round(labels)))
        if not whole:
            raise DataError(f"{path.name}: 'labels' are {labels.dtype}, not class indices",
                            hint="give integer class indices (0, 1, 2, ...)")
        return labels.astype(np.int64)
    return labels


def _finite(value: Array, name: str, path: Path, given: Array) -> Array:
    """Data with NaN or infinity is refused up front: calibration ranges and agreement
    measured on it mean nothing. Finite ``given`` numbers (float64) that became infinite in
    the input's dtype are said to overflow it."""
    if value.dtype.kind not in "fc":
        return value
    bad = int(value.size - np.count_nonzero(np.isfinite(value)))
    overflowed = bad - int(given.size - np.count_nonzero(np.isfinite(given))) \
        if given.dtype.kind in "fc" and given.dtype != value.dtype else 0
    if overflowed:
        raise DataError(f"{path.name}: input {name!r} has {overflowed} {given.dtype} values "
                        f"beyond the {value.dtype} range the model takes (they overflow "
                        f"{value.dtype} to infinity; largest magnitude "
                        f"{float(np.nanmax(np.abs(given[np.isfinite(given)]))):.3g})",
                        hint=f"scale the data into the model's input range "
                             f"(|x| < {float(np.finfo(value.dtype).max):.3g})")
    if bad:
        raise DataError(f"{path.name}: input {name!r} has {bad} non-finite values (NaN or "
                        f"infinity) of {value.size}",
                        hint="clean or drop those samples: calibration and evaluation need "
                             "finite numbers")
    return value


def _single(inputs: list[TensorInfo], path: Path) -> TensorInfo:
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise DataError(f"{path.name} holds one array but the model has inputs {names}",
                        hint="use an .npz with one array per input name")
    return inputs[0]


def _npz(path: Path, inputs: list[TensorInfo]) -> Dataset:
    with np.load(path, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    labels = arrays.pop("labels", None)
    if len(inputs) == 1 and inputs[0].name not in arrays and len(arrays) == 1:
        arrays = {inputs[0].name: next(iter(arrays.values()))}
    missing = [i.name for i in inputs if i.name not in arrays]
    if missing:
        raise DataError(f"{path.name} has no array for inputs {missing} (it has {sorted(arrays)})",
                        hint="name each array after the model input it feeds")
    return Dataset({i.name: arrays[i.name] for i in inputs}, labels)


def _fit(spec: TensorInfo, value: Array, path: Path) -> Array:
    # samples first ("N"); a dynamic dim after it takes any size ("any")
    expected = [("N" if i == 0 else "any") if d == -1 else d for i, d in enumerate(spec.shape)]
    given_shape = list(value.shape)
    fits = len(value.shape) == len(spec.shape) and all(
        e in (-1, g) for e, g in zip(spec.shape[1:], value.shape[1:], strict=True))
    if not fits:
        raise DataError(
            f"{path.name}: input {spec.name!r} expects shape {expected} dtype {spec.dtype}, "
            f"given shape {given_shape} dtype {value.dtype}",
            hint="samples first, then the model's input shape")
    target = np.dtype(spec.dtype)
    if value.dtype != target and not np.can_cast(value.dtype, target, "same_kind"):
        raise DataError(f"{path.name}: input {spec.name!r} expects dtype {spec.dtype}, "
                        f"given {value.dtype} with shape {given_shape}",
                        hint=f"save the data as {spec.dtype}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is named by _finite
        return np.ascontiguousarray(value.astype(target, copy=False))


def _images(folder: Path, inputs: list[TensorInfo], scale: Scale) -> Dataset:
    spec = _single(inputs, folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images in {folder}", hint=f"add {sorted(IMAGE_SUFFIXES)} files")
    nchw, (height, width, channels) = _layout(spec)
    height, width = (height if height > 0 else DYNAMIC_SIDE), (width if width > 0 else DYNAMIC_SIDE)
    classes = sorted({p.parent for p in files} - {folder})
    labels = np.array([classes.index(p.parent) for p in files]) if classes else None
    stack = np.stack([_image(p, width, height, channels) for p in files]).astype(np.float32)
    factor, offset = _SCALES[scale]
    stack = stack * factor + offset
    if nchw:
        stack = stack.transpose(0, 3, 1, 2)
    return Dataset({spec.name: stack.astype(spec.dtype)}, labels)


def _layout(spec: TensorInfo) -> tuple[bool, tuple[int, int, int]]:
    if len(spec.shape) != 4:
        raise DataError(f"input {spec.name!r} has shape {list(spec.shape)}, not an image batch",
                        hint="pass .npy or .npz data for non-image models")
    _, a, b, c = spec.shape
    if c in (1, 3, 4):
        return False, (a, b, c)
    if a in (1, 3, 4):
        return True, (b, c, a)
    raise DataError(f"cannot tell NHWC from NCHW in input shape {list(spec.shape)}",
                    hint="pass .npy or .npz data laid out for the model")


def _image(path: Path, width: int, height: int, channels: int) -> Array:
    """One image as ``channels`` 8-bit planes at ``width`` x ``height``: turned as its EXIF
    orientation says, 16-bit samples scaled to 8 bits (not saturated), and transparency
    composited on black."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            img = _eight_bit(ImageOps.exif_transpose(opened))
            mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
            if channels != 4 and _transparent(img):
                black = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(black, img.convert("RGBA"))
            resized = img.convert(mode).resize((width, height))
            array = np.asarray(resized, dtype=np.float32)
    except (OSError, Image.DecompressionBombError) as exc:  # PIL's UnidentifiedImageError is
        # an OSError; so is a truncated file; a decompression bomb is neither
        raise DataError(f"cannot read image {path}: {exc}",
                        hint="remove it from the folder, or pass .npy / .npz data") from exc
    return array[..., None] if channels == 1 else array


def _eight_bit(img: Any) -> Any:
    """A 16-bit (or 32-bit integer) grey image as 8-bit grey: PIL's own conversion clips
    every value above 255 to white."""
    from PIL import Image

    if not (img.mode == "I" or img.mode.startswith("I;16")):
        return img
    values = np.asarray(img, dtype=np.float64) / 257.0
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), "L")


def _transparent(img: Any) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or \
        (img.mode == "P" and "transparency" in img.info)
