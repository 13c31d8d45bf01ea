"""A session's input side: queued clients' audio is not decoded; one message cannot expand without bound."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest
import sphn
from server_harness import FRAME, load_tiny_models, synth_audio
from test_server_session import ScriptedWebSocket

from duplex.server import protocol
from duplex.server.frames import ogg_header_pages, ogg_opus_seconds
from duplex.server.protocol import ProtocolError
from duplex.server.service import DuplexService, ServerSettings
from duplex.server.session import MAX_DECODED_SECONDS_PER_MESSAGE, Session


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


def ogg_page(packets: list[bytes], sequence: int, granule: int, serial: int) -> bytes:
    """One Ogg page (CRC left 0: the server reads durations before any decoder sees the page)."""
    lacing = b"".join(bytes([255] * (len(p) // 255) + [len(p) % 255]) for p in packets)
    header = b"OggS" + bytes([0, 0]) + struct.pack("<qIII", granule, serial, sequence, 0) + bytes([len(lacing)])
    return header + lacing + b"".join(packets)


def expanding_message(seconds: float) -> bytes:
    """A small page of many 120 ms packets (CELT 20 ms frames, code 3 with 6 frames each): a few bytes,
    ``seconds`` of audio once decoded."""
    packet = bytes([(31 << 3) | 3, 6])  # config 31 (CELT, 20 ms), code 3, 6 frames, no payload
    return ogg_page([packet] * int(round(seconds / 0.12)), sequence=2, granule=0, serial=1)


def test_packet_durations_are_read_from_their_headers():
    writer = sphn.OpusStreamWriter(24000)
    audio = synth_audio(10, 1)
    pages = [writer.append_pcm(audio[i * FRAME:(i + 1) * FRAME]) for i in range(10)]
    assert [round(ogg_opus_seconds(p), 3) for p in pages] == [0.08] * 10  # the Opus headers count 0
    assert len(ogg_header_pages(pages[0])) == 2 and ogg_header_pages(pages[1]) == []
    message = expanding_message(4.8)
    assert len(message) < 150 and ogg_opus_seconds(message) == pytest.approx(4.8)


def test_a_message_that_would_decode_to_seconds_of_audio_is_refused(models):
    async def main():
        service = DuplexService(models, ServerSettings(max_sessions=1))
        session = Session(ScriptedWebSocket(frames=0), service)
        decoded = []
        session.inbound.opus_in = type("Spy", (), {"append_bytes": lambda self, b: decoded.append(b) or []})()
        with pytest.raises(ProtocolError, match=f"at most {MAX_DECODED_SECONDS_PER_MESSAGE:g} s"):
            session.inbound.decode(expanding_message(4.8))
        return decoded

    assert asyncio.run(main()) == []  # refused before the decoder saw it


class QueuedWebSocket(ScriptedWebSocket):
    """Streams ``frames`` of audio while queued (the only slot is taken), then hangs up."""

    async def receive(self) -> dict:
        if self.incoming:
            await asyncio.sleep(0)
            return {"type": "websocket.receive", "bytes": self.incoming.pop(0)}
        return {"type": "websocket.disconnect", "code": 1000}

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)


def test_a_queued_clients_audio_is_not_decoded(models):
    async def main():
        service = DuplexService(models, ServerSettings(max_sessions=1, max_queue=4))
        assert service.admission.try_acquire()  # the only slot is taken: the client queues
        session = Session(QueuedWebSocket(frames=50), service)
        decoded = []
        session.inbound.opus_in = type("Spy", (), {"append_bytes": lambda self, b: decoded.append(b) or []})()
        await asyncio.wait_for(session.run(), 10)
        return service, session, decoded

    service, session, decoded = asyncio.run(main())
    assert decoded == []  # 4 s of audio arrived while queued: none of it was decoded
    assert service.metrics.frames_dropped.labels("in")._value.get() == pytest.approx(50)  # counted from headers
    assert service.metrics.rejected.labels("left_queue")._value.get() == 1
    assert len(session.inbound._headers) == 2  # only the stream's header pages were kept
    assert np.isclose(session.inbound.discarded_bytes, sum(len(m) - 1 for m in QueuedWebSocket(50).incoming)
                      - sum(len(p) for p in session.inbound._headers))
