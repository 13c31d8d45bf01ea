"""Hang-ups end a session at once even when the model runs behind real time; fast clients keep
their backpressure (the session's receive buffer is bounded)."""

from __future__ import annotations

import asyncio
import time

import pytest
import sphn
from server_harness import FRAME, SlowFakeEngine, live_server, load_tiny_models, synth_audio
from starlette.websockets import WebSocketState

from duplex.client.client import DuplexClient
from duplex.server import protocol
from duplex.server.service import DuplexService, ServerSettings
from duplex.server.session import Session

STEP_SECONDS = 0.25  # the fake model steps 3x slower than real time (80 ms frames)
STREAM_FRAMES = 30  # 2.4 s of real-time audio: ~10 frames stepped, a backlog of ~5 s of steps
# Each audio message is followed by an (ignored) kind-6 ping this big, so that the client's unread
# backlog spans several socket reads (asyncio reads <= 256 KiB at a time), as a long backlog or a
# browser's own send buffer does: the close frame cannot ride along in the read of queued audio.
PADDING_BYTES = 200_000
HANG_UP_SECONDS = 1.5  # how soon a hang-up must free the slot; half the >= 3 s backlog a late one waits for


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


async def stream_in_real_time(client: DuplexClient, frames: int, seed: int) -> None:
    audio = synth_audio(frames, seed)
    padding = bytes([protocol.MessageKind.PING]) + bytes(PADDING_BYTES)
    start = time.monotonic()
    for i in range(frames):
        await client.send_pcm(audio[i * FRAME:(i + 1) * FRAME])
        await client.send_raw(padding)
        await asyncio.sleep(max(0.0, start + (i + 1) * 0.08 - time.monotonic()))


async def wait_until(predicate, timeout: float) -> float:
    """Seconds until ``predicate()`` held (or ``timeout`` when it never did)."""
    start = time.monotonic()
    while not predicate() and time.monotonic() - start < timeout:
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def test_hang_up_frees_the_slot_at_once_while_the_model_lags(models):
    engine = SlowFakeEngine(batch_size=1, step_seconds=STEP_SECONDS)
    with live_server(models, engine=engine, max_sessions=1, max_queue=1) as server:
        metrics = server.service.metrics

        async def alone():
            client = await DuplexClient.connect(server.url, timeout=10)
            await stream_in_real_time(client, STREAM_FRAMES, seed=1)
            backlog = STREAM_FRAMES - engine.steps
            closing = asyncio.ensure_future(client.close())
            freed = await wait_until(lambda: metrics.active_sessions._value.get() == 0, timeout=10)
            await closing
            return backlog, freed

        backlog, freed = asyncio.run(alone())
        assert backlog >= 12  # the model really was behind (>= 3 s of steps pending) ...
        # ... yet the hang-up freed the slot within a few ticks (a late hang-up would wait for the backlog,
        # >= 12 steps of 0.25 s = 3 s; 1.5 s leaves room for a loaded machine).
        assert freed < HANG_UP_SECONDS
        assert metrics.sessions_ended.labels("client_closed")._value.get() == 1

        async def with_a_queued_caller():
            first = await DuplexClient.connect(server.url, timeout=10)
            queued = asyncio.ensure_future(DuplexClient.connect(server.url, timeout=30))
            await stream_in_real_time(first, STREAM_FRAMES, seed=2)
            assert not queued.done() and server.service.admission.queue_length == 1
            hung_up = time.monotonic()
            closing = asyncio.ensure_future(first.close())
            second = await queued
            admitted = time.monotonic() - hung_up
            await second.close()
            await closing
            return admitted

        assert asyncio.run(with_a_queued_caller()) < HANG_UP_SECONDS
        ended = lambda: metrics.sessions_ended.labels("client_closed")._value.get()  # noqa: E731
        asyncio.run(wait_until(lambda: metrics.active_sessions._value.get() == 0 and ended() >= 3, timeout=5))
        assert ended() == 3


class FloodingWebSocket:
    """A client that has ``frames`` audio messages ready at once (a file streamed as fast as possible)."""

    def __init__(self, frames: int) -> None:
        writer = sphn.OpusStreamWriter(24000)
        audio = synth_audio(frames, 5)
        self.incoming = [protocol.encode_audio(writer.append_pcm(audio[i * FRAME:(i + 1) * FRAME]))
                         for i in range(frames)]
        self.read = 0
        self.client = None
        self.query_params: dict = {}
        self.application_state = WebSocketState.CONNECTED

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict:
        await asyncio.sleep(0)
        if self.read < len(self.incoming):
            self.read += 1
            return {"type": "websocket.receive", "bytes": self.incoming[self.read - 1]}
        await asyncio.Event().wait()  # nothing more
        raise AssertionError

    async def send_bytes(self, data: bytes) -> None:
        pass

    async def close(self) -> None:
        self.application_state = WebSocketState.DISCONNECTED


def test_a_fast_client_is_read_up_to_the_receive_buffer_bytes_then_throttled(models, monkeypatch):
    import duplex.server.session.inbound as inbound

    bound = 40_000  # bytes of undecoded audio (the default is 2 MiB: minutes of audio)
    monkeypatch.setattr(inbound, "RECEIVE_BUFFER_BYTES", bound)

    async def main():
        # The worker is not started: nothing is stepped, so the session's buffers fill up and stay full.
        service = DuplexService(models, ServerSettings(max_sessions=1, inbox_frames=8, drain_seconds=0.2))
        ws = FloodingWebSocket(600)
        session = Session(ws, service)
        running = asyncio.ensure_future(session.run())
        previous, deadline = -1, time.monotonic() + 60
        while ws.read != previous and time.monotonic() < deadline:  # until the reader stops reading
            previous = ws.read
            await asyncio.sleep(0.5)
        read, buffered = ws.read, session.inbound.received_bytes
        session.finish("shutdown")
        await asyncio.wait_for(running, 10)
        await service.shutdown(drain_timeout=1)
        return read, buffered, ws, service

    read, buffered, ws, service = asyncio.run(main())
    sizes = [len(m) - 1 for m in ws.incoming]
    assert bound < buffered <= bound + max(sizes)  # the reader stopped just past the bound ...
    assert read < len(ws.incoming)  # ... without reading everything (TCP backpressure from there on)
    assert service.metrics.active_sessions._value.get() == 0 and service.admission.active == 0


def test_a_throttled_client_is_ended_with_a_clear_error_before_any_keepalive_timeout(models, monkeypatch):
    import duplex.server.session.inbound as inbound

    monkeypatch.setattr(inbound, "RECEIVE_BUFFER_BYTES", 20_000)
    monkeypatch.setattr(inbound, "MAX_THROTTLED_SECONDS", 0.5)

    async def main():
        service = DuplexService(models, ServerSettings(max_sessions=1, inbox_frames=8, drain_seconds=0.2))
        ws = FloodingWebSocket(300)
        sent: list[bytes] = []

        async def send_bytes(data: bytes) -> None:
            sent.append(data)

        ws.send_bytes = send_bytes
        await asyncio.wait_for(Session(ws, service).run(), 10)  # nothing steps: the client stays ahead
        await service.shutdown(drain_timeout=1)
        return sent, service

    sent, service = asyncio.run(main())
    errors = [m[1:].decode() for m in sent if m[0] == protocol.MessageKind.ERROR]
    assert len(errors) == 1 and errors[0].startswith("client too far ahead of real time")
    assert service.metrics.sessions_ended.labels("too_far_ahead")._value.get() == 1


def test_a_client_far_faster_than_the_model_keeps_its_keepalive_and_loses_nothing(models):
    """Issue 14.1: backpressure used to stop the socket reads, so the keepalive pong went unseen and the
    connection died (at 40 s with uvicorn's defaults; here the keepalive is 1 + 1 s)."""
    frames = 500  # 40 s of audio, sent at once; the model needs >= 5 s for it (10 ms per step)
    engine = SlowFakeEngine(batch_size=1, step_seconds=0.01)
    keepalive = {"ws_ping_interval": 1.0, "ws_ping_timeout": 1.0}
    with live_server(models, engine=engine, uvicorn_options=keepalive, max_sessions=1) as server:
        async def main():
            client = await DuplexClient.connect(server.url, timeout=10)
            audio = synth_audio(frames, 3)
            for i in range(frames):  # as fast as the socket takes it (the client answers pings meanwhile)
                await client.send_pcm(audio[i * FRAME:(i + 1) * FRAME])
                await asyncio.sleep(0)
            received = 0
            async with asyncio.timeout(30):
                async for event in client:
                    if type(event).__name__ == "AudioEvent":
                        received += 1
                        if received >= frames - 2:
                            break
            await client.close()
            return received

        received = asyncio.run(main())
        metrics = server.service.metrics
        asyncio.run(wait_until(lambda: metrics.active_sessions._value.get() == 0, timeout=5))
    assert engine.steps >= frames - 2 and received >= frames - 2  # every frame stepped and answered
    assert metrics.sessions_ended.labels("client_closed")._value.get() == 1  # closed by the client, at the end


class UnclosableWebSocket(FloodingWebSocket):
    """Sends a little audio, hangs up, and then its close never completes (a peer that reads nothing)."""

    async def receive(self) -> dict:
        if self.read < len(self.incoming):
            return await super().receive()
        return {"type": "websocket.disconnect", "code": 1000}

    async def close(self) -> None:
        await asyncio.Event().wait()


def test_a_close_that_never_completes_does_not_hold_the_slot(models):
    async def main():
        service = DuplexService(models, ServerSettings(max_sessions=1))
        start = time.monotonic()
        await asyncio.wait_for(Session(UnclosableWebSocket(3), service).run(), 10)
        return time.monotonic() - start, service

    elapsed, service = asyncio.run(main())
    assert elapsed < 4.0  # bounded by the 1 s close timeout (plus load), not by the peer
    assert service.admission.active == 0 and service.metrics.sessions_ended.labels("client_closed")._value.get() == 1


def test_a_client_that_never_reads_gets_the_too_slow_error_not_a_keepalive_close(models):
    """Issue 14.2: the server's socket buffers absorbed the unread output, so the outbox never filled and
    the keepalive (close 1011, no kind-5) cut such clients instead of the documented "too slow" rule."""
    import socket

    import websockets

    engine = SlowFakeEngine(batch_size=1, step_seconds=0.001)
    with live_server(models, engine=engine, max_sessions=1, outbox_frames=10) as server:
        async def main():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            async with websockets.connect(server.url, sock=sock, max_queue=1, ping_interval=None) as ws:
                writer = sphn.OpusStreamWriter(24000)
                audio = synth_audio(100, 4)
                for i in range(100):  # 8 s of audio at 10x real time, never reading
                    page = writer.append_pcm(audio[i * FRAME:(i + 1) * FRAME])
                    if page:
                        try:
                            await ws.send(protocol.encode_audio(page))
                        except websockets.ConnectionClosed:
                            break
                    await asyncio.sleep(0.008)
                ended = await wait_until(lambda: metrics.sessions_ended.labels("slow_client")._value.get() == 1, 5)
                messages = []
                try:
                    async with asyncio.timeout(5):
                        async for message in ws:  # now read everything the server had sent
                            messages.append(message)
                except (websockets.ConnectionClosed, TimeoutError):
                    pass
                return ended, messages

        metrics = server.service.metrics
        ended, messages = asyncio.run(main())
    assert ended < 5  # ended by the slow-client rule within seconds (a keepalive needs 20 + 20 s)
    errors = [m[1:].decode() for m in messages if m[:1] == bytes([protocol.MessageKind.ERROR])]
    assert errors and errors[-1].startswith("client too slow")
