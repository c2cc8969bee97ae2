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

Reading is bounded: only the arrays an input (and ``labels``) needs are read, only the
first ``limit`` samples of each, and the samples kept may hold at most
:data:`MAX_DATA_BYTES` in the input's dtype (checked from the file's header, before the
data is read). Files that are not regular files (a FIFO, a device) are refused, as are
files that are not ``.npy`` / ``.npz`` or hold Python objects.
"""

from __future__ import annotations

import math
import stat
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from edgefleet.agent.runtime.base import Array, TensorInfo
from edgefleet.converter.config import Scale
from edgefleet.converter.errors import DataError

__all__ = ["DYNAMIC_SIDE", "IMAGE_SUFFIXES", "MAX_DATA_BYTES", "Dataset", "load_dataset"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
DYNAMIC_SIDE = 224  # images for inputs with a dynamic height or width are resized to this
MAX_DATA_BYTES = 1 << 30  # one file's samples held in memory, in the inputs' dtypes
MAX_HASHED_BYTES = 8 << 30  # a data file or an image folder's images, hashed for the lineage
MAX_IMAGE_PIXELS = 50_000_000  # one image decoded: 200 MB as RGBA (PIL only warns up to
# twice its own limit of 89 M pixels, and refuses above 179 M)
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


def load_dataset(path: Path, inputs: list[TensorInfo], scale: Scale = "0-1",
                 limit: int | None = None) -> Dataset:
    """The data at ``path`` fitted to ``inputs``: its first ``limit`` samples (all when
    None), read only as far as needed."""
    if not path.exists():
        raise DataError(f"data {path} does not exist", hint="check the path")
    _regular(path, allow_dir=True)
    _hashable(path)
    if path.is_dir():
        data = _images(path, inputs, scale, limit)
    elif path.suffix == ".npy":
        spec = _single(inputs, path)
        data = Dataset({spec.name: _npy(path, spec, limit)})
    elif path.suffix == ".npz":
        data = _npz(path, inputs, limit)
    else:
        raise DataError(f"cannot read {path.name}",
                        hint="use .npy, .npz (arrays by input name, 'labels') or an image folder")
    fitted = {i.name: _finite(_fit(i, data.inputs[i.name], path), i.name, path,
                              data.inputs[i.name])
              for i in inputs}
    return Dataset(fitted, _checked_labels(data.labels, len(next(iter(fitted.values()))), path))


def _regular(path: Path, allow_dir: bool = False) -> None:
    """A FIFO or a device would block the read or never end: refused by name."""
    mode = path.stat().st_mode
    if stat.S_ISREG(mode) or (allow_dir and stat.S_ISDIR(mode)):
        return
    raise DataError(f"{path} is not a regular file (a FIFO, socket or device)",
                    hint="give a .npy, .npz or image file saved on disk")


def _hashable(path: Path) -> None:
    """The bundle's lineage hashes the data it was made from, whole: bounded at
    :data:`MAX_HASHED_BYTES` (a sparse file declaring 60 GiB took 77 s), checked now."""
    files = [path] if not path.is_dir() else \
        [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    size = sum(p.stat().st_size for p in files)
    if size > MAX_HASHED_BYTES:
        raise DataError(f"{path} holds {size / 2**30:.1f} GiB: a bundle's lineage hashes the "
                        f"data it was made from, at most {MAX_HASHED_BYTES / 2**30:.0f} GiB",
                        hint="give a file (or folder) of the samples used only")


def _unreadable(path: Path, exc: BaseException) -> DataError:
    with path.open("rb") as raw:
        pickled = raw.read(1) == b"\x80"  # a pickle's protocol marker, where .npy has magic
    if pickled or "Object arrays" in str(exc):
        return DataError(f"{path.name} holds Python objects (pickled data), which edgefleet "
                         "does not load", hint="save plain numeric arrays (np.save / "
                         "np.savez of float or integer arrays)")
    return DataError(f"{path.name} is not a readable {path.suffix} file, or it is cut short "
                     f"({type(exc).__name__}: {exc})",
                     hint="save the data again with np.save / np.savez")


def _fewer(each: int, things: str, smaller: str) -> str:
    fit = MAX_DATA_BYTES // max(each, 1)
    if fit == 0:
        return f"{smaller}: one alone takes {each / 2**30:.1f} GiB"
    return f"give at most {fit} {things}, or {smaller}"


def _npy(path: Path, spec: TensorInfo, limit: int | None) -> Array:
    """The first ``limit`` samples of an ``.npy``, read from its header on (never the rest)."""
    try:
        array = _Header(path.open, path.stat().st_size)
        return _bounded(array, path, spec.name, np.dtype(spec.dtype), limit)
    except (ValueError, EOFError, OSError) as exc:
        raise _unreadable(path, exc) from exc


def _bounded(array: _Header, path: Path, name: str, dtype: np.dtype[Any],
             limit: int | None) -> Array:
    """The first ``limit`` samples of ``array`` read into memory, refused beyond
    :data:`MAX_DATA_BYTES` (in the input's dtype) before any is read."""
    if array.ndim == 0:
        raise DataError(f"{path.name}: {name!r} is a single number, not samples",
                        hint="put the samples along the first axis")
    rows = min(array.shape[0], limit) if limit is not None else array.shape[0]
    if rows == 0:
        raise DataError(f"{path.name}: {name!r} holds no samples (shape {list(array.shape)})",
                        hint="give at least one sample along the first axis")
    per_row = math.prod(array.shape[1:]) * max(dtype.itemsize, array.dtype.itemsize)
    if rows * per_row > MAX_DATA_BYTES:
        raise DataError(f"{path.name}: {name!r} holds {rows} samples of {per_row:,} bytes "
                        f"({rows * per_row / 2**30:.1f} GiB), above the "
                        f"{MAX_DATA_BYTES / 2**30:.0f} GiB of data a conversion holds",
                        hint=_fewer(per_row, "samples (a random subset keeps the classes)",
                                    "smaller samples"))
    return np.array(array[:rows])
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


def _npz(path: Path, inputs: list[TensorInfo], limit: int | None) -> Dataset:
    """Only the members an input or ``labels`` takes are read, each bounded."""
    if not zipfile.is_zipfile(path):  # numpy would try it as a pickle, and say so
        raise _unreadable(path, ValueError("not a zip archive"))
    _directory_bounded(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = [n for n in archive.files]
            if len(inputs) == 1 and inputs[0].name not in names and \
                    len([n for n in names if n != "labels"]) == 1:
                member = {inputs[0].name: next(n for n in names if n != "labels")}
            elif len(inputs) == 1 and inputs[0].name == "labels" and names == ["labels"]:
                member = {"labels": "labels"}
            else:
                member = {i.name: i.name for i in inputs if i.name in names}
            missing = [i.name for i in inputs if i.name not in member]
            if missing:
                raise DataError(f"{path.name} has no array for inputs {missing} (it has "
                                f"{sorted(names)})",
                                hint="name each array after the model input it feeds")
            specs = {i.name: i for i in inputs}
            headers = {name: _member(archive, key, path) for name, key in member.items()}
            labelled = "labels" in names and "labels" not in specs  # an input so named
            # takes its array; class labels are then not read from the file
            label_header = _member(archive, "labels", path) if labelled else None
            _same_count(headers, label_header, path)
            arrays = {name: _bounded(header, path, name, np.dtype(specs[name].dtype), limit)
                      for name, header in headers.items()}
            labels = _bounded(label_header, path, "labels", np.dtype(np.int64), limit) \
                if label_header is not None else None
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, RuntimeError,
            NotImplementedError) as exc:  # zipfile: an encrypted member, Deflate64, AES
        raise _unreadable(path, exc) from exc
    return Dataset(arrays, labels)


MAX_NPZ_MEMBERS = 1024  # arrays in an .npz: one an input, and labels
MAX_NPZ_DIRECTORY = 1 << 20  # bytes of its central directory, which zipfile reads whole


def _directory_bounded(path: Path) -> None:
    """The zip's end record, read before zipfile parses the central directory it points to
    (whole, into memory): an .npz of a million empty members took 789 MB, one whose end
    record claims a 3 GiB directory read 3 GiB."""
    size = path.stat().st_size
    with path.open("rb") as file:
        file.seek(max(0, size - (1 << 16) - 22))
        tail = file.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        return  # zipfile refuses it, said as unreadable
    entries = int.from_bytes(tail[at + 10:at + 12], "little")
    directory = int.from_bytes(tail[at + 12:at + 16], "little")
    wide = tail.rfind(b"PK\x06\x06", 0, at)  # zip64: the counts are in its own record
    if wide >= 0 and len(tail) >= wide + 56:
        entries = int.from_bytes(tail[wide + 32:wide + 40], "little")
        directory = int.from_bytes(tail[wide + 40:wide + 48], "little")
    if entries > MAX_NPZ_MEMBERS or directory > MAX_NPZ_DIRECTORY:
        raise DataError(f"{path.name} lists {entries:,} members in a directory of "
                        f"{directory:,} bytes: an .npz holds one array an input (at most "
                        f"{MAX_NPZ_MEMBERS})",
                        hint="save the data again with np.savez(PATH, NAME=ARRAY, ...)")


class _Header:
    """An ``.npy`` stream (a file, or an ``.npz`` member) seen through its header: its shape
    and dtype, and its first rows read from the stream only when sliced, never the rest."""

    def __init__(self, open_stream: Callable[[str], IO[bytes]], size: int) -> None:
        self.open = open_stream
        with open_stream("rb") as raw:
            shape, self.fortran, dtype = _read_header(raw)
            self.body = size - raw.tell()  # bytes after the header: a lying shape shows
        if dtype.hasobject:
            raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
        if any(d < 0 for d in shape):  # numpy's parser takes them; a read of -n reads all
            raise ValueError(f"the header declares shape {list(shape)}: dims are 0 or more")
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)

    def __getitem__(self, rows: slice) -> Array:
        count = len(range(*rows.indices(self.shape[0])))
        per_row = math.prod(self.shape[1:])
        size = self.shape[0] * per_row if self.fortran else count * per_row
        wanted = size * self.dtype.itemsize  # column-major: the first rows are not first
        if wanted > MAX_DATA_BYTES:
            raise ValueError(f"a Fortran-ordered array of {wanted:,} bytes is read whole")
        if not 0 <= wanted <= self.body:  # checked before reading: a read allocates what
            # it asks, and one of a negative size reads the whole stream
            raise EOFError(f"the array ends after {self.body:,} of {wanted:,} bytes")
        with self.open("rb") as raw:
            _read_header(raw)
            data = raw.read(wanted)
        if len(data) != wanted:
            raise EOFError(f"the array ends after {len(data):,} of {wanted:,} bytes")
        if self.fortran:
            whole = np.frombuffer(data, self.dtype).reshape(self.shape, order="F")
            return whole[rows]
        return np.frombuffer(data, self.dtype).reshape(count, *self.shape[1:])


def _read_header(raw: Any) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    version = np.lib.format.read_magic(raw)
    read = np.lib.format.read_array_header_2_0 if version >= (2, 0) else \
        np.lib.format.read_array_header_1_0
    shape, fortran, dtype = read(raw)
    return tuple(shape), bool(fortran), dtype


def _member(archive: Any, key: str, path: Path) -> _Header:
    member = f"{key}.npy"
    if member not in archive.zip.namelist():
        raise DataError(f"{path.name}: member {key!r} is not a .npy array",
                        hint="save the data with np.savez")
    return _Header(lambda mode: archive.zip.open(member), archive.zip.getinfo(member).file_size)


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


def _images(folder: Path, inputs: list[TensorInfo], scale: Scale,
            limit: int | None = None) -> Dataset:
    spec = _single(inputs, folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.is_dir())
    if not files:
        raise DataError(f"no images in {folder}", hint=f"add {sorted(IMAGE_SUFFIXES)} files")
    for p in files:
        _regular(p)
    nchw, (height, width, channels) = _layout(spec)
    height, width = (height if height > 0 else DYNAMIC_SIDE), (width if width > 0 else DYNAMIC_SIDE)
    classes = sorted({p.parent for p in files} - {folder})
    loose = [p for p in files if p.parent == folder]
    if classes and loose:
        raise DataError(f"{folder} has {len(loose)} images at its top level and "
                        f"{len(files) - len(loose)} in class sub-folders",
                        hint="put every image in a class sub-folder (labelled by the "
                             "sub-folder), or none of them (unlabelled)")
    files = files[:limit] if limit is not None else files
    per_image = height * width * channels * max(np.dtype(spec.dtype).itemsize, 4)
    if len(files) * per_image > MAX_DATA_BYTES:
        raise DataError(f"{folder}: {len(files)} images at {height}x{width}x{channels} take "
                        f"{len(files) * per_image / 2**30:.1f} GiB, above the "
                        f"{MAX_DATA_BYTES / 2**30:.0f} GiB of data a conversion holds",
                        hint=_fewer(per_image, "images", "a smaller --input-size"))
    labels = np.array([classes.index(p.parent) for p in files]) if classes else None
    # filled in place, in the input's layout: every copy of the whole stack (a transpose
    # made contiguous, a cast) added its size to the peak
    factor, offset = _SCALES[scale]
    shape = (len(files), channels, height, width) if nchw else \
        (len(files), height, width, channels)
    stack = np.empty(shape, np.float32)
    for index, p in enumerate(files):
        image = _image(p, width, height, channels) * factor + offset
        stack[index] = image.transpose(2, 0, 1) if nchw else image
    return Dataset({spec.name: stack.astype(spec.dtype, copy=False)}, labels)


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
        with warnings.catch_warnings():  # PIL's own bomb warning: refused below, by name
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened:
            pixels = opened.size[0] * opened.size[1]  # known from the header, before decoding
            limit = Image.MAX_IMAGE_PIXELS or MAX_IMAGE_PIXELS
            if pixels > min(limit, MAX_IMAGE_PIXELS):
                raise DataError(f"image {path} has {pixels:,} pixels ({opened.size[0]}x"
                                f"{opened.size[1]}), above the {min(limit, MAX_IMAGE_PIXELS):,} "
                                "edgefleet decodes (a decompression bomb, or a photo far "
                                "larger than any model input)",
                                hint=f"resize it (every image is resized to the model's input, "
                                     f"{width}x{height}), or remove it from the folder")
            img = _eight_bit(ImageOps.exif_transpose(opened))
            mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
            if channels != 4 and _transparent(img):
                black = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(black, img.convert("RGBA"))
            resized = img.convert(mode).resize((width, height))
            array = np.asarray(resized, dtype=np.float32)
    except DataError:
        raise
    except Exception as exc:  # PIL's plugins raise OSError, ValueError, SyntaxError,
        # struct.error, ... for content they cannot decode or convert (a LAB TIFF, a PPM
        # with a broken header): one image's failure, named
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}",
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


def _same_count(headers: dict[str, _Header], labels: _Header | None, path: Path) -> None:
    """Every input of an ``.npz`` holds as many samples as the others (row i of each is one
    sample), and ``labels`` one a sample: checked from the headers, before any is read."""
    counts = {name: h.shape[0] for name, h in headers.items() if h.ndim}
    if len(set(counts.values())) > 1:
        said = ", ".join(f"{name!r} {count}" for name, count in counts.items())
        raise DataError(f"{path.name}: the inputs hold different numbers of samples ({said}); "
                        "row i of every input is one sample",
                        hint="give every input the same number of samples, in the same order")
    if labels is not None and labels.ndim == 1 and counts and \
            labels.shape[0] != next(iter(counts.values())):
        raise DataError(f"{path.name}: 'labels' has shape {list(labels.shape)} for "
                        f"{next(iter(counts.values()))} samples",
                        hint="give one class index a sample, as a 1-D array in the samples' "
                             "order")
