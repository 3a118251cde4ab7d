"""Bounded reading of one zip entry: sizes checked before, output capped during.

``zipfile`` parses the central directory well, but its reader decompresses LZMA data without
an output bound and trusts declared sizes until the end. For a file that may be hostile we
read the raw compressed bytes ourselves and inflate them in chunks whose output is capped
(``zlib``'s and ``lzma``'s ``max_length``), so an entry never produces more than its declared
size (itself capped) plus one chunk. This is the project's own code; the zip layout is from
PKWARE's APPNOTE (local file header: 30 fixed bytes, then name and extra field).
"""

from __future__ import annotations

import lzma
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from edgeslim.errors import BundleError

__all__ = ["Limits", "bomb_ratio", "check_declared", "read_entry"]

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_IN_CHUNK = 1 * MiB
_OUT_CHUNK = 4 * MiB
_MAX_LZMA_DICT = 256 * MiB


@dataclass(frozen=True)
class Limits:
    """What a bundle may hold; every size is checked before anything is decompressed.

    Sizes are uncompressed bytes. ``max_ratio`` caps uncompressed/compressed for entries over
    ``ratio_floor`` bytes (a deflated member that expands a thousandfold is a bomb, not a model).
    """

    max_manifest_bytes: int = 1 * MiB
    max_model_bytes: int = 2 * GiB
    max_file_bytes: int = 512 * MiB
    max_total_bytes: int = 3 * GiB
    max_entries: int = 256
    max_ratio: float = 200.0
    ratio_floor: int = 1 * MiB


DEFAULT_LIMITS = Limits()


def bomb_ratio(info: zipfile.ZipInfo, limits: Limits) -> float | None:
    """The entry's expansion ratio when it is over ``max_ratio`` (for entries over
    ``ratio_floor`` bytes): what a reader refuses as a likely bomb; None when within."""
    if info.file_size <= limits.ratio_floor:
        return None
    ratio = info.file_size / max(info.compress_size, 1)
    return ratio if ratio > limits.max_ratio else None


def check_declared(info: zipfile.ZipInfo, cap: int, limits: Limits) -> None:
    """Refuse an entry whose declared size or compression ratio is over the limits."""
    name = info.filename
    if info.file_size > cap:
        raise BundleError(
            f"Entry {name!r} declares {info.file_size} bytes, over the limit of {cap} bytes "
            "for it; refusing to decompress it."
        )
    ratio = bomb_ratio(info, limits)
    if ratio is not None:
        raise BundleError(
            f"Entry {name!r} would expand {ratio:.0f}x ({info.compress_size} -> "
            f"{info.file_size} bytes), over the limit of {limits.max_ratio:.0f}x: refusing "
            "a likely decompression bomb."
        )


def _data_offset(f: BinaryIO, info: zipfile.ZipInfo, archive_size: int) -> int:
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise BundleError(f"Entry {info.filename!r} has no valid local header: the file is "
                          "truncated or corrupt.")
    n_name, n_extra = struct.unpack("<HH", head[26:30])
    raw_name = f.read(n_name)
    encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
    if raw_name.decode(encoding, "replace") != info.orig_filename:
        raise BundleError(f"Entry {info.filename!r} is named differently in its local header "
                          "and in the central directory; refusing an ambiguous archive.")
    start = info.header_offset + 30 + n_name + n_extra
    if start + info.compress_size > archive_size:
        raise BundleError(f"Entry {info.filename!r} runs past the end of the file: the bundle "
                          "is truncated.")
    return start


def _raw_chunks(f: BinaryIO, remaining: int, name: str) -> Iterator[bytes]:
    while remaining > 0:
        raw = f.read(min(_IN_CHUNK, remaining))
        if not raw:
            raise BundleError(f"Entry {name!r} is truncated.")
        remaining -= len(raw)
        yield raw


def _inflate(chunks: Iterator[bytes]) -> Iterator[bytes]:
    d = zlib.decompressobj(-15)
    for raw in chunks:
        data = raw
        while data:
            yield d.decompress(data, _OUT_CHUNK)
            data = d.unconsumed_tail
    while not d.eof:  # output still held inside the decompressor
        piece = d.decompress(b"", _OUT_CHUNK)
        if not piece:
            break
        yield piece


def _unlzma(chunks: Iterator[bytes], name: str) -> Iterator[bytes]:
    head = b""
    for raw in chunks:  # the zip LZMA header: version (2), props size (2), props (5)
        head += raw
        if len(head) >= 4 and len(head) >= 4 + struct.unpack("<H", head[2:4])[0]:
            break
    if len(head) < 9:
        raise BundleError(f"Entry {name!r} has a truncated LZMA header.")
    psize = struct.unpack("<H", head[2:4])[0]
    if psize != 5:
        raise BundleError(f"Entry {name!r} has LZMA properties of {psize} bytes, not 5.")
    props, rest = head[4:9], head[9:]
    lclppb, dict_size = props[0], int.from_bytes(props[1:5], "little")
    if lclppb >= 9 * 5 * 5 or dict_size > _MAX_LZMA_DICT:
        raise BundleError(f"Entry {name!r} has invalid or oversized LZMA properties.")
    lc, lp, pb = lclppb % 9, (lclppb // 9) % 5, lclppb // 45
    filt = {"id": lzma.FILTER_LZMA1, "lc": lc, "lp": lp, "pb": pb, "dict_size": dict_size}
    d = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[filt])

    def feed(data: bytes) -> Iterator[bytes]:
        if d.eof:
            if data:
                raise BundleError(f"Entry {name!r} has data after the end of its LZMA stream.")
            return
        yield d.decompress(data, _OUT_CHUNK)
        while not d.eof and not d.needs_input:
            yield d.decompress(b"", _OUT_CHUNK)

    yield from feed(rest)
    for raw in chunks:
        yield from feed(raw)


def read_entry(
    f: BinaryIO, info: zipfile.ZipInfo, cap: int, limits: Limits, archive_size: int
) -> bytes:
    """The entry's bytes; ``BundleError`` if it is over ``cap``, corrupt, truncated or a bomb.

    Memory stays bounded by the declared size (at most ``cap``) plus one output chunk: the
    data produced is counted as it comes and reading stops once it passes the declared size.
    """
    name = info.filename
    check_declared(info, cap, limits)
    method = info.compress_type
    if method == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise BundleError(f"Entry {name!r} is stored uncompressed but its two sizes differ.")
    f.seek(_data_offset(f, info, archive_size))
    chunks = _raw_chunks(f, info.compress_size, name)
    if method == zipfile.ZIP_STORED:
        pieces = chunks
    elif method == zipfile.ZIP_DEFLATED:
        pieces = _inflate(chunks)
    elif method == zipfile.ZIP_LZMA:
        pieces = _unlzma(chunks, name)
    else:
        raise BundleError(f"Entry {name!r} uses zip compression method {method}; bundles use "
                          "stored (0), deflate (8) or lzma (14).")
    out: list[bytes] = []
    produced = crc = 0
    try:
        for piece in pieces:
            produced += len(piece)
            if produced > info.file_size:
                raise BundleError(
                    f"Entry {name!r} expands beyond its declared {info.file_size} bytes: "
                    "refusing a likely decompression bomb."
                )
            crc = zlib.crc32(piece, crc)
            out.append(piece)
    except (zlib.error, lzma.LZMAError, EOFError) as exc:
        raise BundleError(f"Entry {name!r} is corrupt: {exc}.") from None
    if produced != info.file_size:
        raise BundleError(f"Entry {name!r} is truncated: {produced} of {info.file_size} bytes.")
    if crc != info.CRC:
        raise BundleError(f"Entry {name!r} is corrupt: its CRC-32 does not match.")
    return b"".join(out)
