"""One server over a real socket: handshake, audio/text out, parameters, bad input, HTTP endpoints."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import numpy as np
import pytest
import websockets
from server_harness import FRAME, LiveServer, converse, load_tiny_models, synth_audio

from duplex.client.client import DuplexClient, ErrorEvent, ServerError
from duplex.server import protocol
from duplex.server.service import ServerSettings


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


@pytest.fixture(scope="module")
def server(models):
    settings = ServerSettings(max_sessions=3, max_queue=0, send_tokens=True, torch_threads=1,
                              max_message_bytes=4096)
    live = LiveServer(models, settings).start()
    yield live
    live.stop()


def http_get(url: str) -> tuple[int, bytes, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read(), response.headers.get("content-type", "")


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_handshake_is_the_first_message(server):
    async def main():
        async with websockets.connect(server.url) as ws:
            first = await asyncio.wait_for(ws.recv(), 10)
            second = protocol.parse_message(await asyncio.wait_for(ws.recv(), 10))
        return first, second

    first, second = asyncio.run(main())
    assert first == b"\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    assert second.kind is protocol.MessageKind.METADATA
    meta = protocol.decode_metadata(second.payload)
    assert meta["type"] == "session" and meta["sample_rate"] == 24000 and meta["frame_rate"] == 12.5


def test_audio_in_gives_one_frame_out_per_frame_after_the_delay(server, models):
    frames = 16
    result = asyncio.run(converse(server.url, synth_audio(frames, 3)))
    assert len(result.tokens) == frames - 1  # one step of acoustic delay (the first frame's step)
    assert [a.size for a in result.audio] == [FRAME] * (frames - 1)
    assert np.abs(np.concatenate(result.audio)).max() > 0
    pieces = [models.tokenizer.piece(t[0]) for t in result.tokens]
    assert result.text == [p for p in pieces if p]  # ids 0 and 3 never sent, "▁" -> " "
    assert all("▁" not in p for p in result.text)
    assert not result.errors


def test_query_params_are_applied_and_reported(server):
    audio = synth_audio(12, 4)
    sampled = {"text_temperature": 1.0, "audio_temperature": 1.0, "text_topk": 50, "audio_topk": 64,
               "text_seed": 5, "audio_seed": 9, "pad_mult": 0.5}
    greedy, first, second = (asyncio.run(converse(server.url, audio, params)) for params in (None, sampled, sampled))
    meta = first.metadata[0]
    assert meta["sampling"] == {"use_sampling": True, "temp": 1.0, "temp_text": 1.0, "top_k": 64,
                                "top_k_text": 50, "text_seed": 5, "audio_seed": 9, "text_sampling": True,
                                "audio_sampling": True}
    assert "per stream" in meta["sampling_rule"]
    assert meta["unsupported_params"] == ["pad_mult"]
    assert greedy.metadata[0]["sampling"]["use_sampling"] is False  # the fixture's lm_gen_config
    assert first.tokens == second.tokens  # seeded
    assert first.tokens != greedy.tokens
    zero = asyncio.run(converse(server.url, audio, {"text_temperature": 0, "audio_temperature": 0}))
    assert zero.tokens == greedy.tokens  # temperature 0 = greedy


def test_bad_query_param_is_a_kind5_error(server):
    async def main():
        with pytest.raises(ServerError, match="text_topk='many' is not a valid int"):
            await DuplexClient.connect(server.url, params={"text_topk": "many"}, timeout=10)

    asyncio.run(main())


async def _error_after(url: str, payload) -> str:
    """Send one raw message after the handshake; return the kind-5 error text."""
    client = await DuplexClient.connect(url, timeout=10)
    await client.send_raw(payload)
    try:
        while True:
            event = await client.next_event(timeout=10)
            assert event is not None, "connection closed without a kind-5 error"
            if isinstance(event, ErrorEvent):
                return event.message
    finally:
        await client.close()


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty message"),
        (b"\x01" + b"this is not an ogg stream " * 20, "not a valid Ogg/Opus stream"),
        (b"\x01" + b"O" * 5000, "exceeds the limit of 4096 bytes"),
        ("hello", "text frames are not supported"),
    ],
)
def test_bad_messages_end_only_that_session(server, payload, message):
    async def main():
        good = asyncio.ensure_future(converse(server.url, synth_audio(10, 5), realtime=True))
        await asyncio.sleep(0.2)
        error = await _error_after(server.url, payload)
        return error, await good

    error, good = asyncio.run(main())
    assert message in error
    assert len(good.tokens) == 9 and not good.errors


def test_ignored_kinds_keep_the_session_going(server):
    async def main():
        client = await DuplexClient.connect(server.url, timeout=10)
        for raw in (b"\x03\x00", b"\x06", b"\x2a junk", b"\x04{}", b"\x02text", b"\x00\x00"):
            await client.send_raw(raw)
        await client.send_pcm(synth_audio(6, 6))
        frames = 0
        while frames < 4:
            event = await client.next_event(timeout=20)
            assert event is not None and not isinstance(event, ErrorEvent), event
            frames += type(event).__name__ == "AudioEvent"
        await client.close()

    asyncio.run(main())


def test_disconnect_mid_stream_frees_the_slot(server):
    metrics = server.service.metrics

    async def main():
        clients = [await DuplexClient.connect(server.url, timeout=10) for _ in range(3)]
        for client in clients:
            await client.send_pcm(synth_audio(5, 7))
        assert server.service.scheduler.active == 3
        with pytest.raises(ServerError, match="busy"):  # max_queue 0: a 4th client is refused
            await DuplexClient.connect(server.url, timeout=10)
        clients[0].ws.transport.abort()  # vanishes without a close handshake
        for client in clients:
            await client.close()

    asyncio.run(main())
    wait_until(lambda: server.service.scheduler.active == 0 and metrics.active_sessions._value.get() == 0)
    assert server.service.admission.active == 0
    assert asyncio.run(converse(server.url, synth_audio(6, 8))).tokens


def test_http_endpoints(server):
    status, body, _ = http_get(server.http + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    info = json.loads(http_get(server.http + "/api/info")[1])
    assert info["model"] == "tiny" and info["sample_rate"] == 24000 and info["frame_rate"] == 12.5
    assert info["max_sessions"] == 3 and info["defaults"]["use_sampling"] is False
    status, body, content_type = http_get(server.http + "/metrics")
    text = body.decode()
    assert content_type.startswith("text/plain")
    for name in ("duplex_active_sessions", "duplex_queue_length", 'duplex_step_seconds_bucket{le="0.01",stage="lm"}',
                 "duplex_frames_late_total", 'duplex_frames_dropped_total{direction="out"}',
                 'duplex_bytes_total{direction="in"}', "duplex_sessions_ended_total"):
        assert name in text, name
    status, body, content_type = http_get(server.http + "/")
    assert status == 200 and content_type.startswith("text/html")
