"""A strict check of the Ogg pages a client sends, before the Opus decoder (sphn) sees them.

sphn's reader does not verify page CRCs and accepts any first header, so a bit-flipped page or a Theora
or text stream followed by Opus packets would be decoded. :class:`OggPageChecker` parses the byte stream
incrementally (pages may be split across websocket messages) and raises :class:`OggError` for:

* bytes that do not start a page (``OggS``, version 0), or a page larger than Ogg allows;
* a page whose CRC-32 (polynomial 0x04C11DB7, over the page with its CRC field zeroed) does not match;
* a first page that is not the beginning of a logical stream whose first packet is ``OpusHead``;
* a page of another logical stream (multiplexed or chained streams are not supported).

The CRC uses zlib's table-driven CRC-32 through bit reversal (the Ogg CRC is the same polynomial,
unreflected, initial value 0, no final xor), so checking costs about as much as copying the bytes.
"""

from __future__ import annotations

import struct
import zlib

_HEADER = struct.Struct("<4sBBqIIIB")  # capture, version, flags, granule, serial, sequence, crc, segments
HEADER_BYTES = _HEADER.size  # 27
MAX_PAGE_BYTES = HEADER_BYTES + 255 + 255 * 255
FLAG_BOS = 0x02
_REVERSED_BYTES = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


class OggError(ValueError):
    """The stream is not a single, intact Ogg/Opus stream; the text is meant for the client."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"audio is not a valid Ogg/Opus stream: {detail}")


def _reverse32(value: int) -> int:
    return int(f"{value:032b}"[::-1], 2)


def ogg_crc(data: bytes) -> int:
    """The Ogg CRC-32 of ``data`` (unreflected polynomial 0x04C11DB7, init 0, no final xor)."""
    reflected = zlib.crc32(data.translate(_REVERSED_BYTES), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return _reverse32(reflected)


def ogg_crc_reference(data: bytes) -> int:
    """The same CRC bit by bit (slow; for tests)."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


class OggPageChecker:
    """Checks one connection's Ogg byte stream page by page; :meth:`feed` raises OggError."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._serial: int | None = None
        self.pages = 0

    def feed(self, data: bytes) -> None:
        """Check every page completed by ``data`` (a partial page waits for the next call)."""
        self._buffer += data
        while True:
            size = self._complete_page_size()
            if size is None:
                return
            page = bytes(self._buffer[:size])
            del self._buffer[:size]
            self._check_page(page)

    def _complete_page_size(self) -> int | None:
        buf = self._buffer
        if len(buf) < 4:
            if bytes(buf) != b"OggS"[:len(buf)]:
                raise OggError("no OggS page header")
            return None
        if bytes(buf[:4]) != b"OggS":
            raise OggError("no OggS page header")
        if len(buf) < HEADER_BYTES:
            return None
        if buf[4] != 0:
            raise OggError(f"unsupported Ogg version {buf[4]}")
        segments = buf[26]
        if len(buf) < HEADER_BYTES + segments:
            return None
        body = sum(buf[HEADER_BYTES:HEADER_BYTES + segments])
        size = HEADER_BYTES + segments + body
        return size if len(buf) >= size else None

    def _check_page(self, page: bytes) -> None:
        _, _, flags, _, serial, sequence, crc, segments = _HEADER.unpack_from(page)
        zeroed = page[:22] + b"\0\0\0\0" + page[26:]
        if ogg_crc(zeroed) != crc:
            raise OggError(f"Ogg page {sequence} is corrupt (CRC mismatch)")
        if self._serial is None:
            body = page[HEADER_BYTES + segments:]
            if not flags & FLAG_BOS or not body.startswith(b"OpusHead"):
                raise OggError("the stream does not start with an OpusHead header (only Opus is accepted)")
            self._serial = serial
        elif serial != self._serial:
            raise OggError("a second logical stream was sent (only one Opus stream per session)")
        self.pages += 1
