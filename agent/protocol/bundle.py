"""Build, read and verify model bundles (``.efb``).

A bundle is one uncompressed tar holding ``manifest.json``, ``manifest.sig``,
the model (``model.tflite`` or ``model.onnx``), ``health.npz`` and optionally
``labels.txt``. Reading checks, in this order: member names (no absolute path,
no "..", no links, no duplicates), the signature over the manifest bytes, then
every file's size and sha256. Runtime compatibility and the health check come
after, on the device (see ``agent.loader``).

An encrypted bundle holds ``model.<format>.enc`` instead of the plain model
(``agent.protocol.encryption``). Reading checks the ciphertext like any file; with
``keys`` it also decrypts, in memory, and refuses when no key matches. Without
``keys`` (a controller, a registry) the model stays sealed and ``model_bytes`` raises.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from agent.protocol.encryption import (
    DecryptionKeys,
    NoDecryptionKeyError,
    RecipientKey,
    decrypt_model,
    encrypt_model,
)
from agent.protocol.errors import (
    BundleFormatError,
    IntegrityError,
    MissingFileError,
    UnsafeMemberError,
)
from agent.protocol.files import atomic_write, sha256_bytes
from agent.protocol.manifest import (
    ENCRYPTED_SCHEMA_VERSION,
    HEALTH_FILE,
    LABELS_FILE,
    FileEntry,
    Manifest,
    parse_manifest,
)
from agent.protocol.signing import SigningKey, TrustedKeys

__all__ = ["BUNDLE_SUFFIX", "Bundle", "build_bundle", "inspect_bundle", "read_bundle",
           "read_manifest", "write_bundle"]

BUNDLE_SUFFIX = ".efb"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MAX_MEMBERS = 16


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
    members = _read_members(source)
    for required in (MANIFEST, SIGNATURE):
        if required not in members:
            raise MissingFileError(f"bundle has no {required}",
                                   hint="rebuild it with 'edgefleet convert' or build_bundle()")
    key_id = trusted.verify(members[MANIFEST], members[SIGNATURE])
    manifest = parse_manifest(members[MANIFEST])
    _check_required(manifest, members.keys())
    _check_files(manifest, members)
    files = {name: members[name] for name in manifest.files}
    return _opened(Bundle(manifest, members[MANIFEST], key_id, files), keys)


def _opened(bundle: Bundle, keys: DecryptionKeys | None) -> Bundle:
    if keys is None or not bundle.manifest.encrypted:
        return bundle
    plain = decrypt_model(bundle.files[bundle.manifest.model_file], bundle.manifest, keys)
    return replace(bundle, plain_model=plain)


def inspect_bundle(source: Path | bytes, keys: DecryptionKeys | None = None) -> Bundle:
    """Open a bundle for inspection only: every check but the signature (``key_id`` is "").

    Never serve what this returns; devices and the controller use :func:`read_bundle`.
    """
    members = _read_members(source)
    if MANIFEST not in members:
        raise MissingFileError("bundle has no manifest.json", hint="rebuild the bundle")
    manifest = parse_manifest(members[MANIFEST])
    _check_required(manifest, members.keys())
    _check_files(manifest, members)
    return _opened(Bundle(manifest, members[MANIFEST], "", {n: members[n] for n in manifest.files}),
                   keys)


def read_manifest(path: Path) -> tuple[Manifest, str]:
    """Only the manifest of a bundle and its sha256 (the bundle's identity), without reading
    or hashing the model: for bundles that verified before they were stored (A/B slots)."""
    try:
        with tarfile.open(path, mode="r:") as archive:
            info = archive.getmember(MANIFEST)
            _check_member(info)
            handle = archive.extractfile(info)
            raw = handle.read() if handle is not None else b""
    except (OSError, KeyError, tarfile.TarError) as exc:
        raise BundleFormatError(f"cannot read the manifest of {path!s}: {exc}",
                                hint="the file is not a complete bundle") from exc
    return parse_manifest(raw), sha256_bytes(raw)


def _read_members(source: Path | bytes) -> dict[str, bytes]:
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise BundleFormatError(f"cannot read bundle {source!s}: {exc.strerror}",
                                hint="check the path") from exc
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as archive:
            return _extract_all(archive)
    except tarfile.TarError as exc:
        raise BundleFormatError(f"not a bundle archive: {exc}",
                                hint="truncated, or not an .efb; fetch it again") from exc


def _extract_all(archive: tarfile.TarFile) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    for info in archive:
        _check_member(info)
        if info.name in members:
            raise UnsafeMemberError(f"member {info.name!r} appears twice",
                                    hint="rebuild the bundle")
        if len(members) >= MAX_MEMBERS:
            raise BundleFormatError(f"bundle has more than {MAX_MEMBERS} members")
        handle = archive.extractfile(info)
        if handle is None:
            raise BundleFormatError(f"member {info.name!r} has no data")
        members[info.name] = handle.read()
    return members


def _check_member(info: tarfile.TarInfo) -> None:
    name = info.name
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise UnsafeMemberError(f"member {name!r} has an absolute path",
                                hint="bundles hold flat relative names only")
    if ".." in path.parts or "\\" in name:
        raise UnsafeMemberError(f"member {name!r} contains '..'",
                                hint="bundles hold flat relative names only")
    if info.issym() or info.islnk():
        raise UnsafeMemberError(f"member {name!r} is a link to {info.linkname!r}",
                                hint="bundles hold regular files only")
    if not info.isfile():
        raise UnsafeMemberError(f"member {name!r} is not a regular file",
                                hint="bundles hold regular files only")


def _check_required(manifest: Manifest, names: Iterable[str]) -> None:
    present = set(names)
    for required in (manifest.model_file, HEALTH_FILE):
        if required not in present:
            raise MissingFileError(f"bundle has no {required}",
                                   hint="the converter writes it; rebuild the bundle")


def _check_files(manifest: Manifest, members: Mapping[str, bytes]) -> None:
    extra = set(members) - set(manifest.files) - {MANIFEST, SIGNATURE}
    if extra:
        raise IntegrityError(f"members not listed in the manifest: {sorted(extra)}",
                             hint="the bundle was altered after signing; rebuild it")
    for name, entry in manifest.files.items():
        data = members.get(name)
        if data is None:
            raise MissingFileError(f"manifest lists {name} but the bundle lacks it",
                                   hint="the bundle is incomplete; fetch or rebuild it")
        if len(data) != entry.size:
            raise IntegrityError(f"{name}: size {len(data)} bytes, manifest says {entry.size}",
                                 hint="the bundle is truncated or altered; fetch it again")
        if sha256_bytes(data) != entry.sha256:
            raise IntegrityError(f"{name}: sha256 differs from the manifest",
                                 hint="the bundle is corrupt or altered; fetch it again")
