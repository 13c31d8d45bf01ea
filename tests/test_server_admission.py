"""Admission queue, busy errors, session time limit and graceful shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest
import sphn
import websockets
from server_harness import FRAME, LiveServer, live_server, load_tiny_models, synth_audio

from duplex.client.client import AudioEvent, DuplexClient, ErrorEvent, ServerError
from duplex.server import protocol
from duplex.server.admission import Admission, Busy, Closed
from duplex.server.service import ServerSettings


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


def test_admission_fifo_positions_busy_and_close():
    async def main():
        admission = Admission(max_sessions=1, max_queue=2)
        positions: dict[str, list[int]] = {"b": [], "c": []}

        async def report(name, position):
            positions[name].append(position)

        await admission.acquire(lambda p: report("a", p))  # takes the slot at once
        b = asyncio.ensure_future(admission.acquire(lambda p: report("b", p)))
        c = asyncio.ensure_future(admission.acquire(lambda p: report("c", p)))
        await asyncio.sleep(0.01)
        assert admission.queue_length == 2 and positions == {"b": [1], "c": [2]}
        with pytest.raises(Busy, match="1 sessions are taken and 2 clients are already waiting"):
            await admission.acquire(lambda p: report("d", p))
        admission.release()  # a leaves: b gets the slot, c moves up
        await asyncio.wait_for(b, 1)
        await asyncio.sleep(0.01)
        assert positions["c"] == [2, 1] and not c.done()
        c.cancel()  # c gives up while queued
        await asyncio.gather(c, return_exceptions=True)
        assert admission.queue_length == 0 and admission.active == 1
        admission.close()
        with pytest.raises(Closed):
            await admission.acquire(lambda p: report("e", p))
        admission.release()
        assert admission.active == 0

    asyncio.run(main())


async def poll(condition, timeout: float = 20.0) -> None:
    """Wait until ``condition()`` is true (AssertionError after ``timeout`` seconds)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_third_client_waits_sees_its_position_and_starts_when_a_slot_frees(models):
    with live_server(models, max_sessions=2, max_queue=2, torch_threads=1) as server:
        async def main():
            first = await DuplexClient.connect(server.url, timeout=10)
            second = await DuplexClient.connect(server.url, timeout=10)
            seen: dict[str, list] = {"third": [], "fourth": []}
            admission = server.service.admission
            third = asyncio.ensure_future(DuplexClient.connect(
                server.url, on_metadata=seen["third"].append, timeout=20))
            await poll(lambda: admission.queue_length == 1 and seen["third"])
            fourth = asyncio.ensure_future(DuplexClient.connect(
                server.url, on_metadata=seen["fourth"].append, timeout=20))
            await poll(lambda: admission.queue_length == 2 and seen["fourth"])
            with pytest.raises(ServerError, match="server busy"):
                await DuplexClient.connect(server.url, timeout=10)
            assert not third.done() and server.service.admission.queue_length == 2
            assert [m["queue_position"] for m in seen["third"]] == [1]
            assert [m["queue_position"] for m in seen["fourth"]] == [2]
            await first.close()
            third_client = await asyncio.wait_for(third, 20)
            await poll(lambda: len(seen["fourth"]) >= 2)
            assert [m["queue_position"] for m in seen["fourth"]] == [2, 1]
            await third_client.send_pcm(synth_audio(6, 1))
            event = await third_client.next_event(timeout=20)
            while not isinstance(event, AudioEvent):
                event = await third_client.next_event(timeout=20)
            fourth.cancel()  # gives up waiting
            for client in (second, third_client):
                await client.close()

        asyncio.run(main())
        assert server.service.metrics.rejected.labels("busy")._value.get() == 1


def test_audio_sent_while_queued_is_dropped_but_keeps_the_ogg_stream_valid(models):
    with live_server(models, max_sessions=1, max_queue=1, torch_threads=1) as server:
        async def main():
            holder = await DuplexClient.connect(server.url, timeout=10)
            writer = sphn.OpusStreamWriter(24000)
            audio = synth_audio(12, 3)
            pages = [writer.append_pcm(audio[i * FRAME:(i + 1) * FRAME]) for i in range(12)]
            async with websockets.connect(server.url) as ws:
                for page in pages[:4]:  # the Ogg headers travel with the first pages
                    await ws.send(protocol.encode_audio(page))
                queued = protocol.decode_metadata((await asyncio.wait_for(ws.recv(), 10))[1:])
                await holder.close()
                assert (await asyncio.wait_for(ws.recv(), 10))[0] == protocol.MessageKind.HANDSHAKE
                for page in pages[4:]:
                    await ws.send(protocol.encode_audio(page))
                kinds = []
                while kinds.count(protocol.MessageKind.AUDIO) < 6:
                    message = await asyncio.wait_for(ws.recv(), 20)
                    kinds.append(message[0])
                    assert message[0] != protocol.MessageKind.ERROR, message
            return queued

        queued = asyncio.run(main())
        assert queued["type"] == "queue" and queued["queue_position"] == 1
        # Kyutai's web client validates every kind-4 object against its server-info schema.
        assert isinstance(queued["text_topk"], int) and isinstance(queued["build_info"], dict)
        assert isinstance(queued["lm_model_file"], str) and isinstance(queued["instance_name"], str)
        assert server.service.metrics.frames_dropped.labels("in")._value.get() == 4


def test_session_time_limit_is_announced_and_enforced(models):
    with live_server(models, max_sessions=1, max_session_seconds=0.6, torch_threads=1) as server:
        async def main():
            client = await DuplexClient.connect(server.url, timeout=10)
            assert client.protocol_version == 0
            errors, meta = [], []
            async for event in client:
                if isinstance(event, ErrorEvent):
                    errors.append(event.message)
                elif hasattr(event, "data"):
                    meta.append(event.data)
            return meta, errors

        meta, errors = asyncio.run(main())
    assert meta[0]["max_session_seconds"] == 0.6
    assert errors == ["session time limit of 0.6 s reached"]


def test_graceful_shutdown_tells_clients_and_drains(models):
    server = LiveServer(models, ServerSettings(max_sessions=1, max_queue=2, torch_threads=1)).start()

    async def main():
        active = await DuplexClient.connect(server.url, timeout=10)
        queued = asyncio.ensure_future(DuplexClient.connect(server.url, timeout=20))
        await active.send_pcm(synth_audio(8, 2))
        await asyncio.sleep(0.5)
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        events = [event async for event in active]
        with pytest.raises(ServerError, match="shutting down"):
            await queued
        await asyncio.to_thread(stopper.join, 30)
        return events

    events = asyncio.run(main())
    assert isinstance(events[-1], ErrorEvent) and events[-1].message == "server shutting down"
    assert any(isinstance(e, AudioEvent) for e in events)  # output was flushed before the error
    assert not server.thread.is_alive()
    metrics = server.service.metrics
    assert metrics.sessions_ended.labels("shutdown")._value.get() == 1
    assert metrics.active_sessions._value.get() == 0
