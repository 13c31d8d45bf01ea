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
from duplex.server.session import RECEIVE_BUFFER_FRAMES, Session

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
        asyncio.run(wait_until(lambda: metrics.active_sessions._value.get() == 0, timeout=5))
        assert metrics.sessions_ended.labels("client_closed")._value.get() == 3


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


def test_a_fast_client_is_read_only_up_to_the_receive_buffer(models):
    inbox = 8

    async def main():
        # The worker is not started: nothing is stepped, so the session's buffers fill up and stay full.
        service = DuplexService(models, ServerSettings(max_sessions=1, inbox_frames=inbox, drain_seconds=0.2))
        ws = FloodingWebSocket(RECEIVE_BUFFER_FRAMES + 150)
        session = Session(ws, service)
        running = asyncio.ensure_future(session.run())
        previous, deadline = -1, time.monotonic() + 60
        while ws.read != previous and time.monotonic() < deadline:  # until the reader stops reading
            previous = ws.read
            await asyncio.sleep(1.0)
        read = ws.read
        session.finish("shutdown")
        await asyncio.wait_for(running, 10)
        await service.shutdown(drain_timeout=1)
        return read, service

    read, service = asyncio.run(main())
    # inbox + the frame the feeder holds + the receive buffer + the message the reader holds
    # (+1: the Opus decoder's start-up delay shifts frames by part of one message)
    expected = inbox + 1 + RECEIVE_BUFFER_FRAMES + 1
    assert expected <= read <= expected + 1
    assert service.metrics.active_sessions._value.get() == 0 and service.admission.active == 0


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
