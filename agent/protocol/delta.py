"""Bundle deltas: a zstd frame that rebuilds bundle B from the bytes of bundle A.

A delta is zstd's "patch from" mode: the old bundle file is the compression dictionary
(raw content, not a trained dictionary), compressed at level 19 with long-distance
matching and a window that covers the whole old bundle, so every unchanged run of the
model is one match into it. Measured against bsdiff on real bundle pairs (BENCHMARKS.md,
"Delta updates"): as small or smaller, and it applies 10-100x faster.

A delta comes from the network: it is hostile input until the bundle it rebuilds has
been verified. :func:`apply_delta` therefore bounds what it does before it decompresses a
byte: the frame must declare exactly the expected output size (the size the desired state
gives the bundle) and a window no larger than the bigger of the two bundles, rounded up
to a power of two; the output is read in chunks and never beyond the expected size, so
memory is the base, the window and one chunk, and time is linear in the expected size.
Whatever goes wrong is a :class:`DeltaError`; the caller falls back to the full bundle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgefleet.agent.protocol.errors import BundleError

__all__ = ["LEVEL", "MAX_SHARE", "DeltaError", "apply_delta", "build_delta", "max_window",
           "worth_it"]

LEVEL = 19  # the level the measurements in BENCHMARKS.md ("Delta updates") were made at
MAX_SHARE = 0.8  # a delta is offered and used only at most this share of the full bundle
_MIN_WINDOW_LOG, _MAX_WINDOW_LOG = 10, 31  # zstd's bounds (31: 64-bit builds)
_CHUNK = 256 * 1024
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # 0xFD2FB528, little-endian: a zstd frame (not skippable)


class DeltaError(BundleError):
    """A delta that cannot rebuild the bundle: corrupt, for another base, or declaring more
    than the bundle's size; the device downloads the full bundle instead."""

    transient = True


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:
        raise DeltaError("deltas need the zstandard package",
                         hint="pip install 'edgefleet[agent]'") from exc
    return zstandard


def worth_it(delta_size: int, full_size: int) -> bool:
    """The rule both sides apply: a delta is used only when it is at most
    :data:`MAX_SHARE` of the full bundle (else the full download costs little more, and
    rebuilding from a base is a step that can fail)."""
    return 0 < delta_size <= MAX_SHARE * full_size


def _window_log(size: int) -> int:
    return min(max(_MIN_WINDOW_LOG, (max(size, 1) - 1).bit_length()), _MAX_WINDOW_LOG)


def max_window(base_size: int, expected_size: int) -> int:
    """The largest window a delta between bundles of these sizes needs (a power of two)."""
    return 1 << _window_log(max(base_size, expected_size))


def build_delta(base: bytes, target: bytes, level: int = LEVEL) -> bytes:
    """The delta that rebuilds ``target`` from ``base`` (content size and checksum in the
    frame)."""
    zstandard = _zstd()
    window_log = _window_log(max(len(base), len(target)))
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(target), window_log=window_log, enable_ldm=True,
        write_content_size=True, write_checksum=True, write_dict_id=False)
    compressor = zstandard.ZstdCompressor(dict_data=_dictionary(zstandard, base),
                                          compression_params=params)
    result: bytes = compressor.compress(target)
    return result


def _dictionary(zstandard: Any, base: bytes) -> Any:
    return zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def apply_delta(base: bytes, delta: bytes, expected_size: int,
                write: Callable[[bytes], object]) -> int:
    """Rebuild the bundle from ``base`` and ``delta``, passing it to ``write`` in chunks;
    returns the bytes written (always ``expected_size``). DeltaError on anything else."""
    zstandard = _zstd()
    bound = max_window(len(base), expected_size)
    _check_frame(zstandard, delta, expected_size, bound)
    try:
        decompressor = zstandard.ZstdDecompressor(dict_data=_dictionary(zstandard, base),
                                                  max_window_size=bound)
        return _drain(decompressor.stream_reader(delta, read_across_frames=False),
                      expected_size, write)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"the delta does not apply to this base: {exc}",
                         hint="the full bundle is downloaded instead") from exc


def _check_frame(zstandard: Any, delta: bytes, expected_size: int, bound: int) -> None:
    """Refuse, from the frame headers alone, anything but exactly one zstd frame (no
    skippable frame, nothing after it), and a frame that declares another size, no size,
    a dictionary id, or a window beyond ``bound``."""
    if _frame_length(delta) != len(delta):
        raise DeltaError("the delta is not exactly one zstd frame",
                         hint="the full bundle is downloaded instead")
    try:
        frame = zstandard.get_frame_parameters(delta)
    except zstandard.ZstdError as exc:
        raise DeltaError(f"the delta is not a zstd frame: {exc}",
                         hint="the full bundle is downloaded instead") from exc
    if frame.content_size != expected_size or frame.dict_id or frame.window_size > bound:
        raise DeltaError(f"the delta declares {frame.content_size} bytes with a window of "
                         f"{frame.window_size} (dictionary {frame.dict_id}); this bundle is "
                         f"{expected_size} bytes, windows up to {bound}",
                         hint="the full bundle is downloaded instead")


def _frame_length(delta: bytes) -> int:
    """The length of the zstd frame ``delta`` starts with, walked block by block (RFC 8878
    3.1.1); -1 when it does not start with a zstd frame's magic number (a skippable frame
    has another) or is cut short."""
    if len(delta) < 6 or delta[:4] != ZSTD_MAGIC:
        return -1
    descriptor = delta[4]
    single, checksum = descriptor & 0x20, descriptor & 0x04
    fcs = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
    at = 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 0x03] + fcs
    while at + 3 <= len(delta):
        header = int.from_bytes(delta[at:at + 3], "little")
        kind, size = (header >> 1) & 0x03, header >> 3
        if kind == 3:  # reserved
            return -1
        at += 3 + (1 if kind == 1 else size)
        if header & 1:  # the last block
            end = at + (4 if checksum else 0)
            return end if end <= len(delta) else -1
    return -1


def _drain(reader: Any, expected_size: int, write: Callable[[bytes], object]) -> int:
    written = 0
    with reader:
        while chunk := reader.read(min(_CHUNK, expected_size - written + 1)):
            written += len(chunk)
            if written > expected_size:
                raise DeltaError(f"the delta rebuilds more than the bundle's {expected_size} "
                                 "bytes", hint="the full bundle is downloaded instead")
            write(chunk)
    if written != expected_size:
        raise DeltaError(f"the delta rebuilt {written} of the bundle's {expected_size} bytes",
                         hint="the full bundle is downloaded instead")
    return written
