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
from duplex.server.frames import FrameAssembler
from duplex.server.session import Session


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
    assert metrics.frames_out._value.get() == 0  # no audio reached the client: nothing counted as sent
    assert metrics.active_sessions._value.get() == 0 and service.admission.active == 0


def test_frame_assembler_cuts_any_chunking_into_frames():
    assembler = FrameAssembler(4)
    pieces = [np.arange(3), np.arange(3, 4), np.arange(4, 13), np.zeros(0), np.arange(13, 16)]
    frames = [f for piece in pieces for f in assembler.add(piece.astype(np.float32))]
    np.testing.assert_array_equal(np.concatenate(frames), np.arange(16, dtype=np.float32))
    assert all(f.size == 4 for f in frames) and len(frames) == 4


class ScriptedWebSocket(StuckWebSocket):
    """Like StuckWebSocket; ``send_error`` makes every send raise (the client is gone)."""

    def __init__(self, frames: int, send_error: Exception | None = None, reads_after: int = 2) -> None:
        super().__init__(frames)
        self.send_error = send_error
        self.reads_after = reads_after

    async def send_bytes(self, data: bytes) -> None:
        if self.send_error is not None:
            raise self.send_error
        if len(self.sent) >= self.reads_after:
            await asyncio.Event().wait()
        self.sent.append(data)


def test_admission_is_released_when_the_slot_frees_not_after_the_flush(models):
    """The session's output cannot be flushed (the client stopped reading): the queue must not wait for it."""
    async def main():
        service = DuplexService(models, ServerSettings(max_sessions=1, max_session_seconds=0.3, drain_seconds=2.0,
                                                       torch_threads=1))
        service.start()
        session = asyncio.ensure_future(Session(ScriptedWebSocket(frames=6), service).run())
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while service.scheduler.active == 0 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            while service.scheduler.active == 1 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            released = service.admission.active == 0
            flushing = not session.done()  # still trying to flush for up to drain_seconds
            await asyncio.wait_for(session, 10)
        finally:
            await service.shutdown(drain_timeout=1)
        return released, flushing

    released, flushing = asyncio.run(main())
    assert flushing and released


def test_a_queued_client_that_is_gone_ends_as_left_queue(models):
    """A queue-position send that finds the client gone must not crash the handler."""
    from uvicorn.protocols.utils import ClientDisconnected

    async def main():
        service = DuplexService(models, ServerSettings(max_sessions=1, max_queue=4, torch_threads=1))
        assert service.admission.try_acquire()  # the only slot is taken
        ws = ScriptedWebSocket(frames=0, send_error=ClientDisconnected())
        await asyncio.wait_for(Session(ws, service).run(), 10)
        return service

    service = asyncio.run(main())
    assert service.metrics.rejected.labels("left_queue")._value.get() == 1
    assert service.admission.queue_length == 0 and service.admission.active == 1


def test_a_client_admitted_as_shutdown_starts_is_told(models):
    async def main():
        service = DuplexService(models, ServerSettings(max_sessions=1, torch_threads=1))
        service.start()
        service.shutting_down = True  # shutdown began after admission, before the session joined
        ws = ScriptedWebSocket(frames=4)
        try:
            await asyncio.wait_for(Session(ws, service).run(), 5)
        finally:
            service.shutting_down = False
            await service.shutdown(drain_timeout=1)
        return service, ws

    service, ws = asyncio.run(main())
    assert ws.sent == [protocol.encode_error("server shutting down")] and ws.closed
    assert service.admission.active == 0 and service.metrics.active_sessions._value.get() == 0


class SilentWriter:
    """An Opus writer that never emits a page (audio held back): only text and token messages queue up."""

    def append_pcm(self, pcm) -> bytes:
        return b""


def test_every_queued_message_counts_against_the_slow_client_limit(models):
    async def main():
        service = DuplexService(models, ServerSettings(max_sessions=1, outbox_frames=3, send_tokens=True))
        session = Session(ScriptedWebSocket(frames=0), service)
        session.outbound.opus_out = SilentWriter()
        text_id = next(i for i in range(4, 100) if service.text_piece(i))
        tokens = np.zeros(9, dtype=np.int64)
        for _ in range(100):
            session.deliver(np.zeros(FRAME, np.float32), text_id, tokens)
        return session

    session = asyncio.run(main())
    assert session.end_reason == "slow_client"
    assert session.outbound.outbox.qsize() <= 3 * 3 + 2  # checked before each frame (up to 3 messages)


def test_a_full_scheduler_after_admission_rejects_the_client_and_releases_the_slot(models, caplog):
    """Admission let the client in but every batch slot is bound: busy error, no leaked admission."""
    async def main():
        service = DuplexService(models, ServerSettings(max_sessions=1, torch_threads=1))
        sampling, _ = service.sampling_for(protocol.parse_query_params({}))
        squatter = service.scheduler.join(object(), sampling)  # bound without going through admission
        ws = ScriptedWebSocket(frames=0)
        try:
            await asyncio.wait_for(Session(ws, service).run(), 5)
        finally:
            service.scheduler.leave(squatter)
        return service, ws

    with caplog.at_level("INFO", logger="duplex.server.sessions"):
        service, ws = asyncio.run(main())
    assert len(ws.sent) == 1 and ws.sent[0][0] == protocol.MessageKind.ERROR and b"busy" in ws.sent[0]
    assert ws.closed and service.admission.active == 0
    assert service.metrics.rejected.labels("busy")._value.get() == 1
    assert any('"end_reason":"busy"' in r.getMessage() for r in caplog.records if r.name == "duplex.server.sessions")


def test_frames_out_counts_model_frames_once_their_audio_is_sent(models):
    """Sent frames count when their Ogg page went out; the rest count as dropped, never as both."""
    async def main(reads_after: int):
        service = DuplexService(models, ServerSettings(max_sessions=1, outbox_frames=50))
        ws = ScriptedWebSocket(frames=0, reads_after=reads_after)
        session = Session(ws, service)
        sender = asyncio.ensure_future(session.outbound.send_loop(lambda: session.finish("client_closed")))
        for i in range(12):
            session.deliver(synth_audio(1, i), 0, np.zeros(9, dtype=np.int64))
            await asyncio.sleep(0)
        session.end_reason = "client_closed"  # no flush: what is unsent is dropped
        await session._drain_and_close(sender)
        pages = sum(1 for m in ws.sent if m[0] == protocol.MessageKind.AUDIO)
        return service.metrics, session, pages

    metrics, session, pages = asyncio.run(main(reads_after=10**6))  # reads everything
    held = session.outbound.unpaged_frames  # still inside the Opus writer: neither sent nor dropped
    assert pages > 0 and metrics.frames_out._value.get() == 12 - held == session.record.frames_out
    assert metrics.frames_dropped.labels("out")._value.get() == 0

    metrics, session, pages = asyncio.run(main(reads_after=3))  # reads the first 3 messages only
    sent, dropped = metrics.frames_out._value.get(), metrics.frames_dropped.labels("out")._value.get()
    assert pages == 3 and 3 <= sent < 12 and dropped > 0
    assert sent + dropped + session.outbound.unpaged_frames == 12
