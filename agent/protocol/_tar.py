"""A small, strict reader of the tar archives a bundle is (POSIX ustar, pax, GNU long names).

:class:`TarReader` walks the headers only: a member's data is read by :meth:`TarReader.read`
once the caller has checked the member (its name, its type, its size against a cap and
against the signed manifest). Nothing a header declares is allocated before that check, so
a lying size (a sparse member declaring gigabytes, a base-256 size of 2^80) costs nothing.

What it refuses as :class:`~agent.protocol.errors.BundleFormatError`: a damaged header
(checksum, magic, numeric fields), a size that is negative or larger than what is left of
the archive, an extended header (pax or GNU long name) larger than
:data:`MAX_EXTENDED_BYTES` or malformed, a pax global header, and an archive that ends in
the middle of a header. Sparse members (GNU type ``S`` or pax ``GNU.sparse.*``) are
reported as such; the caller refuses them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from edgefleet.agent.protocol.errors import BundleFormatError

__all__ = ["BLOCK", "MAX_EXTENDED_BYTES", "Entry", "TarReader", "check_first_block"]

BLOCK = 512
MAX_EXTENDED_BYTES = 64 * 1024  # the data of one pax or GNU long-name header
MAX_HEADERS = 64  # headers of every kind in one archive (a bundle has at most 16 members)
_KINDS = {b"0": "file", b"\0": "file", b"7": "contiguous file", b"1": "hard link",
          b"2": "symbolic link", b"3": "character device", b"4": "block device",
          b"5": "directory", b"6": "fifo", b"S": "GNU sparse file"}
_EXTENDED = (b"x", b"L", b"K")
_HINT = "the file is truncated or not an .efb; fetch it again or rebuild it"
NOT_A_BUNDLE_HINT = "a bundle is the .efb file 'edgefleet convert' writes; pass one of those"


@dataclass(frozen=True)
class Entry:
    """One member as its headers describe it; ``offset`` is where its data starts."""

    name: str
    kind: str
    linkname: str
    size: int
    offset: int
    sparse: bool = False

    @property
    def regular(self) -> bool:
        return self.kind == "file" and not self.sparse

    @property
    def link(self) -> bool:
        return self.kind in ("hard link", "symbolic link")


@dataclass
class _Pending:
    """What extended headers say about the member that follows them."""

    name: str | None = None
    linkname: str | None = None
    size: int | None = None
    sparse: bool = False
    count: int = 0


class TarReader:
    """Headers of an archive held in ``stream`` (seekable, ``length`` bytes long)."""

    def __init__(self, stream: BinaryIO, length: int) -> None:
        self._stream = stream
        self._length = length

    @property
    def length(self) -> int:
        return self._length

    def entries(self) -> Iterator[Entry]:
        """Each member in archive order; the archive's bounds are checked before moving on."""
        offset, pending, headers = 0, _Pending(), 0
        while (block := self._header(offset)) is not None:
            headers += 1
            if headers > MAX_HEADERS:
                raise BundleFormatError(f"not a bundle archive: more than {MAX_HEADERS} headers",
                                        hint=_HINT)
            entry = _entry(block, offset + BLOCK, pending)
            if block[156:157] in _EXTENDED:
                pending = self._extended(block[156:157], entry, pending)
            else:
                yield entry  # the caller judges its name, type and size first
                pending = _Pending()
            self._check_fits(entry)
            offset = entry.offset + _padded(entry.size)
        if pending.count:
            raise BundleFormatError("not a bundle archive: it ends after an extended header",
                                    hint=_HINT)

    def read(self, entry: Entry) -> bytes:
        """The data of ``entry``: exactly ``entry.size`` bytes (checked to fit the archive)."""
        self._check_fits(entry)
        self._stream.seek(entry.offset)
        data = self._stream.read(entry.size)
        if len(data) != entry.size:
            raise BundleFormatError(f"member {shown(entry.name)} ends early: the archive "
                                    "changed while it was read", hint=_HINT)
        return data

    def _header(self, offset: int) -> bytes | None:
        """The 512-byte header at ``offset``; None at the end of the archive."""
        self._stream.seek(offset)
        block = self._stream.read(BLOCK)
        if not block.strip(b"\0"):
            return None  # an end-of-archive block, or the archive ends between members
        if len(block) < BLOCK:
            raise BundleFormatError(f"not a bundle archive: it ends inside the header at "
                                    f"byte {offset}", hint=_HINT)
        _check_header(block, offset)
        return block

    def _check_fits(self, entry: Entry) -> None:
        left = self._length - entry.offset
        if entry.size > left:
            raise BundleFormatError(
                f"a truncated bundle (or a header that lies): member {shown(entry.name)} "
                f"declares {entry.size} bytes but only {max(left, 0)} follow its header",
                hint=_HINT)

    def _extended(self, flag: bytes, entry: Entry, pending: _Pending) -> _Pending:
        if entry.size > MAX_EXTENDED_BYTES or pending.count >= 4:
            raise BundleFormatError(
                f"an extended header of {entry.size} bytes (or more than 4 in a row) in front "
                f"of a member; bundles need at most {MAX_EXTENDED_BYTES}", hint=_HINT)
        data = self.read(entry)
        pending.count += 1
        if flag == b"x":
            _apply_pax(_pax_records(data), pending)
        elif flag == b"L":
            pending.name = _text(data)
        else:
            pending.linkname = _text(data)
        return pending


def check_first_block(block: bytes) -> None:
    """Refuse an upload from its first 512 bytes: an end-of-archive block, or no tar header."""
    if not block:
        raise BundleFormatError("an empty file, not a bundle", hint=NOT_A_BUNDLE_HINT)
    if not block.strip(b"\0"):
        raise BundleFormatError("not a bundle: the archive holds no members",
                                hint=NOT_A_BUNDLE_HINT)
    if len(block) < BLOCK:
        raise BundleFormatError(f"not a bundle: {len(block)} bytes, shorter than one tar "
                                "header", hint=NOT_A_BUNDLE_HINT)
    _check_header(block, 0)


def shown(name: str, limit: int = 80) -> str:
    """A member name as an error message quotes it: repr (control characters escaped), cut."""
    return repr(name[:limit]) + ("..." if len(name) > limit else "")


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _entry(block: bytes, data_offset: int, pending: _Pending) -> Entry:
    flag = block[156:157]
    if flag == b"g":
        raise BundleFormatError("not a bundle archive: a pax global header",
                                hint="bundles are written without one; rebuild it")
    name = _text(block[0:100])
    if block[257:263] == b"ustar\x00" and block[345] != 0:
        name = f"{_text(block[345:500])}/{name}"
    size = _number(block[124:136], "size", data_offset - BLOCK)
    if flag not in _EXTENDED and pending.size is not None:
        size = pending.size
    return Entry(name=pending.name if pending.name is not None else name,
                 kind=_KINDS.get(flag, f"member of type {flag!r}"),
                 linkname=pending.linkname if pending.linkname is not None
                 else _text(block[157:257]),
                 size=size, offset=data_offset, sparse=pending.sparse)


def _check_header(block: bytes, offset: int) -> None:
    if block[257:262] != b"ustar":
        raise BundleFormatError(f"not a bundle archive: no ustar header at byte {offset}",
                                hint=_HINT)
    stored = _number(block[148:156], "checksum", offset)
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - sum(256 for b in block[:148] + block[156:] if b > 127)
    if stored not in (unsigned, signed):
        raise BundleFormatError(f"not a bundle archive: the header at byte {offset} is damaged "
                                "(checksum)", hint=_HINT)


def _number(field: bytes, what: str, offset: int) -> int:
    """An octal field, or GNU base-256 (first byte 0x80 or 0xff); never negative."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        if field[:1] == b"\xff":
            raise BundleFormatError(f"the header at byte {offset} has a negative {what}",
                                    hint=_HINT)
        return value
    digits = field.replace(b"\0", b" ").strip()
    if digits and not all(48 <= b <= 55 for b in digits):
        raise BundleFormatError(f"the header at byte {offset} has a {what} that is not a "
                                f"number: {digits[:12]!r}", hint=_HINT)
    return int(digits, 8) if digits else 0


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _pax_records(data: bytes) -> dict[str, str]:
    """``"LEN KEY=VALUE\\n"`` records; anything else is a damaged header."""
    records: dict[str, str] = {}
    pos, stop = 0, len(data.rstrip(b"\0"))
    while pos < stop:
        space = data.find(b" ", pos, pos + 21)
        length = int(data[pos:space]) if space > pos and data[pos:space].isdigit() else 0
        end = pos + length
        key, equals, value = data[space + 1:end - 1].partition(b"=")
        if length <= space - pos + 1 or end > len(data) or data[end - 1:end] != b"\n" \
                or not equals or not key:
            raise BundleFormatError(f"a pax header with a malformed record at byte {pos}",
                                    hint=_HINT)
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos = end
    return records


def _apply_pax(records: dict[str, str], pending: _Pending) -> None:
    for key, value in records.items():
        if key.startswith("GNU.sparse."):
            pending.sparse = True
        elif key == "path":
            pending.name = value
        elif key == "linkpath":
            pending.linkname = value
        elif key == "size":
            if not (value.isascii() and value.isdigit() and len(value) <= 20):
                raise BundleFormatError(f"a pax header with a size that is not a number: "
                                        f"{value[:24]!r}", hint=_HINT)
            pending.size = int(value)
