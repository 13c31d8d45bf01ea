"""Per-frame server-side latency: user frame complete at the server -> its model audio sent."""

from __future__ import annotations

import asyncio
import statistics
import time

import numpy as np
import pytest
from server_harness import FRAME, SlowFakeEngine, converse, live_server, load_tiny_models, synth_audio
from starlette.websockets import WebSocketState

from duplex.client.client import DuplexClient
from duplex.server import protocol
from duplex.server.service import DuplexService, ServerSettings
from duplex.server.session import Session

STEP_SECONDS = 0.05  # faster than real time: no backlog builds up


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


def latency_count(metrics) -> float:
    return metrics.registry.get_sample_value("duplex_frame_latency_seconds_count")


def test_every_stepped_frame_is_timed_from_arrival_to_the_send_of_its_output(models):
    frames = 20
    engine = SlowFakeEngine(batch_size=2, step_seconds=STEP_SECONDS)  # output for every stepped frame
    with live_server(models, engine=engine, max_sessions=2) as server:
        metrics = server.service.metrics

        async def main():
            client = await DuplexClient.connect(server.url, timeout=10)
            audio = synth_audio(frames, 3)
            start = time.monotonic()
            for i in range(frames):
                await client.send_pcm(audio[i * FRAME:(i + 1) * FRAME])
                await asyncio.sleep(max(0.0, start + (i + 1) * 0.08 - time.monotonic()))
            deadline = time.monotonic() + 10
            while len(metrics.recent_frame_latencies) < frames and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await client.close()

        asyncio.run(main())
        latencies = list(metrics.recent_frame_latencies)
        assert len(latencies) == frames == latency_count(metrics)
        # Each frame waits at least for its step; real-time input adds at most a frame + grace of waiting.
        assert min(latencies) >= STEP_SECONDS
        # (+0.3 s of slack for a loaded machine; a backlog or mispaired stamps grow by >= 80 ms per frame)
        assert statistics.median(latencies) < STEP_SECONDS + 0.08 + 0.03 + 0.3
        assert b"duplex_frame_latency_seconds_bucket" in metrics.render()


def test_frames_without_model_output_are_not_timed(models):
    with live_server(models, max_sessions=1, send_tokens=True, torch_threads=1) as server:
        result = asyncio.run(converse(server.url, synth_audio(10, 4)))
        metrics = server.service.metrics
        deadline = time.monotonic() + 5
        while latency_count(metrics) < 9 and time.monotonic() < deadline:
            time.sleep(0.02)
    # 10 frames: the tiny LM's delay of one step (the first frame's) leaves 9 with output.
    assert len(result.tokens) == 9
    assert latency_count(metrics) == 9 == len(metrics.recent_frame_latencies)
    assert all(0 < latency < 5 for latency in metrics.recent_frame_latencies)


class HoldingWriter:
    """An Opus writer that emits a page only every other frame (as sphn may when it buffers)."""

    def __init__(self) -> None:
        self.calls = 0

    def append_pcm(self, pcm: np.ndarray) -> bytes:
        self.calls += 1
        return b"OggS-page" if self.calls % 2 == 0 else b""


class IdleWebSocket:
    client = None
    query_params: dict = {}
    application_state = WebSocketState.CONNECTED


def test_a_frame_held_back_by_the_opus_writer_is_timed_with_the_page_that_carries_it(models):
    async def main():
        service = DuplexService(models, ServerSettings(max_sessions=1))
        session = Session(IdleWebSocket(), service)
        session.outbound.opus_out = HoldingWriter()
        silence = np.zeros(FRAME, dtype=np.float32)
        tokens = np.zeros(9, dtype=np.int64)
        for arrived in (1.0, None, 2.0, 3.0):  # None: an output without a user frame's stamp
            session.deliver(silence, 0, tokens, arrived)
        outbox = session.outbound.outbox
        return [outbox.get_nowait() for _ in range(outbox.qsize())]

    items = asyncio.run(main())
    page = protocol.encode_audio(b"OggS-page")
    assert items == [(page, [1.0], 2), (page, [2.0, 3.0], 2)]  # (message, arrivals timed, model frames carried)
