"""Tools to damage bundles on purpose: rewrite, drop or add tar members."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

from edgefleet.agent.protocol.signing import SigningKey


def members(bundle: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive}  # type: ignore[union-attr]


def pack(files: dict[str, bytes], extra: Callable[[tarfile.TarFile], None] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if extra:
            extra(archive)
    return buffer.getvalue()


def with_member(bundle: Path, name: str, data: bytes) -> bytes:
    files = members(bundle.read_bytes())
    files[name] = data
    return pack(files)


def without_member(bundle: Path, name: str) -> bytes:
    files = members(bundle.read_bytes())
    del files[name]
    return pack(files)


def with_link(bundle: Path, name: str, target: str, hard: bool = False) -> bytes:
    def add(archive: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
        info.linkname = target
        archive.addfile(info)

    return pack(members(bundle.read_bytes()), add)


def resigned(bundle: Path, key: SigningKey, edit: Callable[[dict[str, object]], None]) -> bytes:
    """Edit the manifest JSON and sign it again with ``key`` (a validly signed bad bundle)."""
    files = members(bundle.read_bytes())
    manifest = json.loads(files["manifest.json"])
    edit(manifest)
    files["manifest.json"] = json.dumps(manifest).encode()
    files["manifest.sig"] = key.sign(files["manifest.json"])
    return pack(files)
