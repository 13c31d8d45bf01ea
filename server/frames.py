"""Cutting decoded audio of any chunking into the model's fixed-size frames."""

from __future__ import annotations

import numpy as np


class FrameAssembler:
    """Cuts a stream of PCM chunks of any length into fixed-size frames."""

    def __init__(self, frame_size: int) -> None:
        self.frame_size = frame_size
        self._chunks: list[np.ndarray] = []
        self._length = 0

    @property
    def pending(self) -> int:
        """Samples held back (less than one frame)."""
        return self._length

    def add(self, pcm: np.ndarray) -> list[np.ndarray]:
        """Append ``pcm`` ([N] float32); return every complete [frame_size] frame."""
        if pcm.size == 0:
            return []
        self._chunks.append(np.asarray(pcm, dtype=np.float32).reshape(-1))
        self._length += pcm.size
        if self._length < self.frame_size:
            return []
        joined = np.concatenate(self._chunks)
        count = self._length // self.frame_size
        frames = [joined[i * self.frame_size:(i + 1) * self.frame_size] for i in range(count)]
        rest = joined[count * self.frame_size:]
        self._chunks = [rest] if rest.size else []
        self._length = rest.size
        return frames


# ---------------------------------------------------------------------- Ogg/Opus, read without decoding
OPUS_HEADER_MAGICS = (b"OpusHead", b"OpusTags")
_SILK_MS = (10.0, 20.0, 40.0, 60.0)
_HYBRID_MS = (10.0, 20.0)
_CELT_MS = (2.5, 5.0, 10.0, 20.0)


class OggFormatError(ValueError):
    """The bytes are not a sequence of whole Ogg pages."""


def ogg_pages(data: bytes) -> list[bytes]:
    """Split ``data`` into whole Ogg pages (header fields are checked only for framing)."""
    pages, offset = [], 0
    while offset < len(data):
        if data[offset:offset + 4] != b"OggS" or len(data) < offset + 27:
            raise OggFormatError("not an Ogg page")
        count = data[offset + 26]
        table = data[offset + 27:offset + 27 + count]
        if len(table) < count:
            raise OggFormatError("truncated Ogg page")
        length = 27 + count + sum(table)
        if len(data) < offset + length:
            raise OggFormatError("truncated Ogg page")
        pages.append(data[offset:offset + length])
        offset += length
    return pages


def page_packets(page: bytes) -> list[tuple[bytes, bool]]:
    """(bytes of the packet in this page, whether the packet starts in this page) per packet piece."""
    count = page[26]
    table = page[27:27 + count]
    body = memoryview(page)[27 + count:]
    pieces, start, length = [], 0, 0
    starts_here = not page[5] & 0x01  # header type bit 0: this page continues a packet
    for size in table:
        length += size
        if size < 255:
            pieces.append((bytes(body[start:start + length]), starts_here))
            start, length, starts_here = start + length, 0, True
    if length:
        pieces.append((bytes(body[start:start + length]), starts_here))
    return pieces


def opus_packet_seconds(packet: bytes) -> float:
    """Duration of one Opus packet from its TOC byte (RFC 6716, section 3.1); 0 for an empty packet."""
    if not packet:
        return 0.0
    config, code = packet[0] >> 3, packet[0] & 0x03
    if config < 12:
        frame_ms = _SILK_MS[config % 4]
    elif config < 16:
        frame_ms = _HYBRID_MS[config % 2]
    else:
        frame_ms = _CELT_MS[config % 4]
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        frames = packet[1] & 0x3F if len(packet) > 1 else 0
    return frames * frame_ms / 1000.0


def ogg_opus_seconds(data: bytes) -> float:
    """Seconds of audio that decoding ``data`` (whole Ogg/Opus pages) would produce, without decoding it."""
    total = 0.0
    for page in ogg_pages(data):
        for packet, starts_here in page_packets(page):
            if starts_here and not packet.startswith(OPUS_HEADER_MAGICS):
                total += opus_packet_seconds(packet)
    return total


def ogg_header_pages(data: bytes) -> list[bytes]:
    """The pages of ``data`` that carry the Opus stream headers (OpusHead, OpusTags)."""
    return [page for page in ogg_pages(data)
            if any(packet.startswith(OPUS_HEADER_MAGICS) for packet, starts in page_packets(page) if starts)]
