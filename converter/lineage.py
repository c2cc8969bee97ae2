"""A bundle's lineage: what it was converted from, with which tool, config and data.

Files are identified by their sha256. A folder (a SavedModel, an image folder: its images
only) by a tree hash of its regular files that does not depend on where it lies or on file
times::

    sha256( for each file under the folder, in sorted relative POSIX path order:
            relative_path NUL sha256_hex_of_the_file LF )

so ``sha256sum``-style tools can recompute it, and renaming or editing any file
changes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import socket
from importlib import metadata
from pathlib import Path
from typing import Any

from edgefleet.agent.protocol.files import sha256_file
from edgefleet.agent.protocol.manifest import DataRef, Lineage, SourceRef
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.data import IMAGE_SUFFIXES

__all__ = ["LIBRARIES", "config_json", "data_ref", "lineage_of", "path_sha256", "tree_sha256"]

# The distributions whose versions decide what a conversion produces.
LIBRARIES = ("edgefleet", "tensorflow-cpu", "tensorflow", "keras", "onnx", "onnxruntime",
             "tf2onnx", "ai-edge-litert", "ai-edge-quantizer", "numpy")


def tree_files(folder: Path, suffixes: frozenset[str] | None = None) -> list[Path]:
    """The regular files under ``folder`` (a FIFO or device is not data), in sorted relative
    POSIX path order; only those of ``suffixes`` when given (an image folder's images)."""
    return sorted((p for p in folder.rglob("*") if p.is_file()
                   and (suffixes is None or p.suffix.lower() in suffixes)),
                  key=lambda p: p.relative_to(folder).as_posix())


def tree_sha256(folder: Path, suffixes: frozenset[str] | None = None) -> str:
    digest = hashlib.sha256()
    for path in tree_files(folder, suffixes):
        relative = path.relative_to(folder).as_posix()
        digest.update(f"{relative}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def path_sha256(path: Path, suffixes: frozenset[str] | None = None) -> str:
    """A file's sha256, or a folder's tree hash."""
    return tree_sha256(path, suffixes) if path.is_dir() else sha256_file(path)


def size_and_count(path: Path, suffixes: frozenset[str] | None = None) -> tuple[int, int]:
    """Bytes and files a hash of ``path`` reads."""
    if not path.is_dir():
        return path.stat().st_size, 1
    files = tree_files(path, suffixes)
    return sum(p.stat().st_size for p in files), len(files)


def data_ref(path: Path | None) -> DataRef | None:
    """A data set's identity: an image folder by its images only (the files it reads)."""
    if path is None:
        return None
    suffixes = frozenset(IMAGE_SUFFIXES) if path.is_dir() else None
    size, count = size_and_count(path, suffixes)
    return DataRef(path=str(path), sha256=path_sha256(path, suffixes), size=size, files=count)


def config_json(config: ConvertConfig) -> dict[str, Any]:
    """Every field of the frozen config, JSON-ready (paths as given, tuples as lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _libraries() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def lineage_of(config: ConvertConfig, source_kind: str) -> Lineage:
    """Hash the source and the data the conversion read; record the tool and config."""
    size, _ = size_and_count(config.model)
    libraries = _libraries()
    return Lineage(
        source=SourceRef(path=str(config.model), kind=source_kind,
                         sha256=path_sha256(config.model), size=size),
        tool_version=libraries.get("edgefleet", "unknown"), config=config_json(config),
        calibration=data_ref(config.calibration), eval=data_ref(config.eval),
        fine_tune=data_ref(config.fine_tune_data), libraries=libraries,
        host=socket.gethostname() if config.record_host else None)
