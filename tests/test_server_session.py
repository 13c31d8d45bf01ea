"""Session details that a real socket cannot easily provoke: a client that stops reading."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import sphn
from server_harness import FRAME, load_tiny_models, synth_audio
from starlette.websockets import WebSocketState

from duplex.server import protocol
from duplex.server.service import DuplexService, ServerSettings
from duplex.server.session import FrameAssembler, Session


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


class StuckWebSocket:
    """Sends ``frames`` of audio, then neither sends nor reads: its send_bytes blocks after the start."""

    def __init__(self, frames: int) -> None:
        writer = sphn.OpusStreamWriter(24000)
        audio = synth_audio(frames, 21)
        self.incoming = [protocol.encode_audio(writer.append_pcm(audio[i * FRAME:(i + 1) * FRAME]))
                         for i in range(frames)]
        self.sent: list[bytes] = []
        self.client = None
        self.query_params: dict = {}
        self.application_state = WebSocketState.CONNECTED
        self.closed = False

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict:
        if self.incoming:
            return {"type": "websocket.receive", "bytes": self.incoming.pop(0)}
        await asyncio.Event().wait()  # never again
        raise AssertionError

    async def send_bytes(self, data: bytes) -> None:
        if len(self.sent) >= 2:  # handshake and metadata go out, then the client stops reading
            await asyncio.Event().wait()
        self.sent.append(data)

    async def close(self) -> None:
        self.closed = True
        self.application_state = WebSocketState.DISCONNECTED


def test_a_client_that_stops_reading_is_dropped_without_stalling_the_model(models):
    async def main():
        service = DuplexService(models, ServerSettings(max_sessions=2, outbox_frames=3, drain_seconds=0.5,
                                                       torch_threads=1))
        service.start()
        ws = StuckWebSocket(frames=12)
        try:
            await asyncio.wait_for(Session(ws, service).run(), 30)
        finally:
            await service.shutdown(drain_timeout=1)
        return service, ws

    service, ws = asyncio.run(main())
    assert ws.closed and ws.sent[0] == protocol.encode_handshake()
    metrics = service.metrics
    assert metrics.sessions_ended.labels("slow_client")._value.get() == 1
    assert metrics.frames_dropped.labels("out")._value.get() >= 3
    assert metrics.active_sessions._value.get() == 0 and service.admission.active == 0


def test_frame_assembler_cuts_any_chunking_into_frames():
    assembler = FrameAssembler(4)
    pieces = [np.arange(3), np.arange(3, 4), np.arange(4, 13), np.zeros(0), np.arange(13, 16)]
    frames = [f for piece in pieces for f in assembler.add(piece.astype(np.float32))]
    np.testing.assert_array_equal(np.concatenate(frames), np.arange(16, dtype=np.float32))
    assert all(f.size == 4 for f in frames) and len(frames) == 4
