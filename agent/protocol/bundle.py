"""Build, read and verify model bundles (``.efb``).

A bundle is one uncompressed tar holding ``manifest.json``, ``manifest.sig``,
the model (``model.tflite`` or ``model.onnx``), ``health.npz`` and optionally
``labels.txt``. Reading checks, in this order: the members from their tar headers
alone (flat known names only, regular files only, no duplicates, each size under its
cap: :data:`MEMBER_CAPS`, :data:`MAX_FILE_BYTES`), the signature over the manifest
bytes, then every file's size against the signed manifest before it is read, and its
sha256 once read. Nothing but ``manifest.json`` and ``manifest.sig`` is read before
the signature verifies, and no member is read whole before its size was bounded, so a
lying header costs no memory (``agent.protocol._tar``). Runtime compatibility and the
health check come after, on the device (see ``agent.loader``).

An encrypted bundle holds ``model.<format>.enc`` instead of the plain model
(``agent.protocol.encryption``). Reading checks the ciphertext like any file; with
``keys`` it also decrypts, in memory, and refuses when no key matches. Without
``keys`` (a controller, a registry) the model stays sealed and ``model_bytes`` raises.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from edgefleet.agent.protocol._tar import NOT_A_BUNDLE_HINT, Entry, TarReader, shown
from edgefleet.agent.protocol.encryption import (
    DecryptionKeys,
    NoDecryptionKeyError,
    RecipientKey,
    decrypt_model,
    encrypt_model,
)
from edgefleet.agent.protocol.errors import (
    BundleError,
    BundleFormatError,
    IntegrityError,
    MissingFileError,
    UnsafeMemberError,
)
from edgefleet.agent.protocol.files import atomic_write, sha256_bytes
from edgefleet.agent.protocol.manifest import (
    ENCRYPTED_SCHEMA_VERSION,
    ENCRYPTED_SUFFIX,
    HEALTH_FILE,
    LABELS_FILE,
    MODEL_FILES,
    FileEntry,
    Manifest,
    parse_manifest,
)
from edgefleet.agent.protocol.signing import SigningKey, TrustedKeys

__all__ = ["BUNDLE_SUFFIX", "Bundle", "build_bundle", "inspect_bundle", "read_bundle",
           "read_manifest", "write_bundle"]

BUNDLE_SUFFIX = ".efb"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MAX_MEMBERS = 16
KNOWN_MEMBERS = frozenset({MANIFEST, SIGNATURE, HEALTH_FILE, LABELS_FILE, *MODEL_FILES.values(),
                           *(model + ENCRYPTED_SUFFIX for model in MODEL_FILES.values())})
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # read before the signature verifies: small on purpose
MAX_SIGNATURE_BYTES = 4 * 1024  # {"alg", "key_id", "sig"}: about 150 bytes
MAX_FILE_BYTES = 1024 * 1024 * 1024  # any other member; its signed size bounds it first
MEMBER_CAPS = {MANIFEST: MAX_MANIFEST_BYTES, SIGNATURE: MAX_SIGNATURE_BYTES}


@dataclass(frozen=True)
class Bundle:
    """A verified bundle held in memory."""

    manifest: Manifest
    manifest_bytes: bytes
    key_id: str
    files: Mapping[str, bytes]
    plain_model: bytes | None = None  # the decrypted model of an encrypted bundle, in memory

    @property
    def encrypted(self) -> bool:
        return self.manifest.encrypted

    @property
    def model_bytes(self) -> bytes:
        """The model a runtime loads; for an encrypted bundle only once it was decrypted."""
        if not self.manifest.encrypted:
            return self.files[self.manifest.model_file]
        if self.plain_model is None:
            encryption = self.manifest.encryption
            ids = ", ".join(encryption.key_ids) if encryption else ""
            raise NoDecryptionKeyError(
                f"{self.manifest.ref} is encrypted for key ids {ids}; its model was not "
                "decrypted", hint="pass --decrypt-key NAME.x25519 for op-level information")
        return self.plain_model

    @property
    def health_bytes(self) -> bytes:
        return self.files[HEALTH_FILE]

    @property
    def labels(self) -> list[str]:
        raw = self.files.get(LABELS_FILE)
        return raw.decode().splitlines() if raw else []

    @property
    def sha256(self) -> str:
        """Identity of the bundle: the sha256 of its manifest bytes."""
        return sha256_bytes(self.manifest_bytes)


def build_bundle(manifest: Manifest, files: Mapping[str, bytes], key: SigningKey, *,
                 encrypt_for: Sequence[RecipientKey] = ()) -> bytes:
    """Fill the manifest's ``files`` table, sign it and return the archive bytes.

    With ``encrypt_for``, the model (``files[manifest.model_file]``) is replaced by its
    ciphertext and the manifest gains its ``encryption`` section (schema version 2).
    """
    if encrypt_for:
        manifest, files = _seal(manifest, files, encrypt_for)
    entries = {name: FileEntry(sha256=sha256_bytes(data), size=len(data))
               for name, data in sorted(files.items())}
    final = manifest.model_copy(update={"files": entries})
    _check_required(final, files.keys())
    manifest_bytes = final.to_bytes()
    members = {MANIFEST: manifest_bytes, SIGNATURE: key.sign(manifest_bytes), **files}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_bundle(path: Path, manifest: Manifest, files: Mapping[str, bytes],
                 key: SigningKey, *, encrypt_for: Sequence[RecipientKey] = ()) -> Path:
    atomic_write(Path(path), build_bundle(manifest, files, key, encrypt_for=encrypt_for))
    return Path(path)


def _seal(manifest: Manifest, files: Mapping[str, bytes], recipients: Sequence[RecipientKey]
          ) -> tuple[Manifest, dict[str, bytes]]:
    plain_name = manifest.plain_model_file
    if manifest.encrypted or plain_name not in files:
        raise MissingFileError(f"nothing to encrypt: no plain {plain_name} in the bundle files",
                               hint="pass the plain model; encrypt a bundle only once")
    ciphertext, section = encrypt_model(files[plain_name], recipients, manifest.name,
                                        manifest.version, manifest.format)
    sealed = manifest.model_copy(update={"encryption": section,
                                         "schema_version": ENCRYPTED_SCHEMA_VERSION})
    rest = {name: data for name, data in files.items() if name != plain_name}
    return sealed, {**rest, sealed.model_file: ciphertext}


def read_bundle(source: Path | bytes, trusted: TrustedKeys,
                keys: DecryptionKeys | None = None) -> Bundle:
    """Open and verify a bundle; raise the most specific :class:`BundleError`.

    ``keys``: decrypt an encrypted model in memory (and refuse without a matching key);
    None leaves it sealed, for sides that only relay bundles.
    """
    with _archive(source) as reader:
        index = _index(reader)
        manifest_bytes = _read_small(reader, index, MANIFEST)
        key_id = trusted.verify(manifest_bytes, _read_small(reader, index, SIGNATURE))
        manifest = parse_manifest(manifest_bytes)
        files = _read_files(reader, index, manifest)
    return _opened(Bundle(manifest, manifest_bytes, key_id, files), keys)


def _opened(bundle: Bundle, keys: DecryptionKeys | None) -> Bundle:
    if keys is None or not bundle.manifest.encrypted:
        return bundle
    plain = decrypt_model(bundle.files[bundle.manifest.model_file], bundle.manifest, keys)
    return replace(bundle, plain_model=plain)


def inspect_bundle(source: Path | bytes, keys: DecryptionKeys | None = None) -> Bundle:
    """Open a bundle for inspection only: every check but the signature (``key_id`` is "").

    Never serve what this returns; devices and the controller use :func:`read_bundle`.
    """
    with _archive(source) as reader:
        index = _index(reader)
        manifest_bytes = _read_small(reader, index, MANIFEST)
        manifest = parse_manifest(manifest_bytes)
        files = _read_files(reader, index, manifest)
    return _opened(Bundle(manifest, manifest_bytes, "", files), keys)


def read_manifest(path: Path) -> tuple[Manifest, str]:
    """Only the manifest of a bundle and its sha256 (the bundle's identity), without reading
    or hashing the model: for bundles that verified before they were stored (A/B slots)."""
    try:
        with _archive(path) as reader:
            raw = _read_small(reader, _index(reader), MANIFEST)
    except BundleError as exc:
        raise BundleFormatError(f"cannot read the manifest of {path!s}: {exc.message}",
                                hint="the file is not a complete bundle") from exc
    return parse_manifest(raw), sha256_bytes(raw)


@contextmanager
def _archive(source: Path | bytes) -> Iterator[TarReader]:
    """A reader over the file (never read whole) or the bytes; OS errors named."""
    try:
        with _stream(source) as (stream, length):
            yield TarReader(stream, length)
    except OSError as exc:
        raise BundleFormatError(f"cannot read bundle {_source_name(source)}: "
                                f"{exc.strerror or exc}", hint="check the path") from exc
    except (ValueError, OverflowError, EOFError, MemoryError) as exc:
        # TarReader bounds every number before it uses one; should a header still get
        # past it, the bundle is refused like any other unreadable one, never a crash
        raise BundleFormatError(f"not a bundle archive: {type(exc).__name__}",
                                hint="truncated, or not an .efb; fetch it again") from exc


@contextmanager
def _stream(source: Path | bytes) -> Iterator[tuple[BinaryIO, int]]:
    if isinstance(source, bytes):
        yield io.BytesIO(source), len(source)
        return
    if not stat.S_ISREG(os.stat(source).st_mode):  # opening a FIFO blocks for ever
        raise BundleFormatError(f"cannot read bundle {source}: not a regular file (a "
                                "folder, pipe or device)", hint="give the .efb file itself")
    with open(source, "rb") as handle:
        yield handle, os.fstat(handle.fileno()).st_size


def _source_name(source: Path | bytes) -> str:
    return f"of {len(source)} bytes" if isinstance(source, bytes) else str(source)


def _index(reader: TarReader) -> dict[str, Entry]:
    """Step 1 of verification: every member checked from its headers, before any read."""
    if reader.length == 0:
        raise BundleFormatError("an empty file, not a bundle", hint=NOT_A_BUNDLE_HINT)
    index: dict[str, Entry] = {}
    for entry in reader.entries():
        _check_member(entry)
        if entry.name in index:
            raise UnsafeMemberError(f"member {shown(entry.name)} appears twice",
                                    hint="rebuild the bundle")
        if len(index) >= MAX_MEMBERS:
            raise BundleFormatError(f"bundle has more than {MAX_MEMBERS} members")
        _check_cap(entry)
        index[entry.name] = entry
    if not index:
        raise BundleFormatError("not a bundle: the archive holds no members",
                                hint=NOT_A_BUNDLE_HINT)
    return index


def _check_member(entry: Entry) -> None:
    name = entry.name
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise UnsafeMemberError(f"member {shown(name)} has an absolute path",
                                hint="bundles hold flat relative names only")
    if ".." in path.parts or "\\" in name:
        raise UnsafeMemberError(f"member {shown(name)} contains '..'",
                                hint="bundles hold flat relative names only")
    if entry.link:
        raise UnsafeMemberError(f"member {shown(name)} is a link to {shown(entry.linkname)}",
                                hint="bundles hold regular files only")
    if not entry.regular:
        kind = "sparse file" if entry.sparse else entry.kind
        raise UnsafeMemberError(f"member {shown(name)} is a {kind}, not a regular file",
                                hint="bundles hold regular files only; rebuild it with "
                                     "'edgefleet convert'")
    if name not in KNOWN_MEMBERS:
        raise UnsafeMemberError(f"member {shown(name)} is not a bundle file (a bundle holds "
                                f"only {', '.join(sorted(KNOWN_MEMBERS))})",
                                hint="the bundle was altered; rebuild it with 'edgefleet "
                                     "convert'")


def _check_cap(entry: Entry) -> None:
    cap = MEMBER_CAPS.get(entry.name, MAX_FILE_BYTES)
    if entry.size > cap:
        raise BundleFormatError(f"member {shown(entry.name)} declares {entry.size} bytes, more "
                                f"than the {cap} a bundle's {entry.name} may hold",
                                hint="the header lies or the bundle is not an .efb; rebuild "
                                     "it with 'edgefleet convert'")


def _read_small(reader: TarReader, index: Mapping[str, Entry], name: str) -> bytes:
    entry = index.get(name)
    if entry is None:
        raise MissingFileError(f"bundle has no {name}",
                               hint="rebuild it with 'edgefleet convert' (a bundle is the "
                                    ".efb file it writes)")
    return reader.read(entry)


def _read_files(reader: TarReader, index: Mapping[str, Entry],
                manifest: Manifest) -> dict[str, bytes]:
    """Steps 3-4: each listed file's size against the manifest, then read and hash it."""
    _check_required(manifest, index.keys())
    _check_listed(manifest, index)
    files: dict[str, bytes] = {}
    for name, listed in manifest.files.items():
        data = reader.read(index[name])
        if sha256_bytes(data) != listed.sha256:
            raise IntegrityError(f"{name}: sha256 differs from the manifest",
                                 hint="the bundle is corrupt or altered; fetch it again")
        files[name] = data
    return files


def _check_required(manifest: Manifest, names: Iterable[str]) -> None:
    present = set(names)
    for required in (manifest.model_file, HEALTH_FILE):
        if required not in present:
            raise MissingFileError(f"bundle has no {required}",
                                   hint="the converter writes it; rebuild the bundle")


def _check_listed(manifest: Manifest, index: Mapping[str, Entry]) -> None:
    """Every listed file is present with the size the manifest gives it, and nothing else."""
    extra = set(index) - set(manifest.files) - {MANIFEST, SIGNATURE}
    if extra:
        raise IntegrityError(f"members not listed in the manifest: {sorted(extra)}",
                             hint="the bundle was altered after signing; rebuild it")
    for name, listed in manifest.files.items():
        entry = index.get(name)
        if entry is None:
            raise MissingFileError(f"manifest lists {shown(name)} but the bundle lacks it",
                                   hint="the bundle is incomplete; fetch or rebuild it")
        if entry.size != listed.size:
            raise IntegrityError(f"{name}: size {entry.size} bytes, manifest says {listed.size}",
                                 hint="the bundle is truncated or altered; fetch it again")
