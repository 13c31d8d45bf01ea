"""A failing model step: sessions end with a kind-5 error, and the server recovers or stops admitting."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from server_harness import SlowFakeEngine, converse, live_server, load_tiny_models, synth_audio

from duplex.client.client import DuplexClient, ErrorEvent, ServerError


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


class FailingEngine(SlowFakeEngine):
    """A fake engine whose step number ``fail_at`` raises; ``reset_all`` may raise too (unrecoverable)."""

    def __init__(self, batch_size: int, fail_at: int, reset_works: bool = True) -> None:
        super().__init__(batch_size, step_seconds=0.001)
        self.fail_at = fail_at
        self.reset_works = reset_works
        self.resets = 0

    def step(self, pcm: np.ndarray, ready: np.ndarray | None = None):
        if self.steps + 1 == self.fail_at:
            self.steps += 1
            raise RuntimeError("boom")
        return super().step(pcm, ready)

    def reset_all(self) -> None:
        self.resets += 1
        if not self.reset_works:
            raise RuntimeError("device lost")


def healthz(server) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{server.http}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def stream_until_error(url: str, frames: int) -> list[str]:
    """Send ``frames`` frames, then read until the server ends the session; return its kind-5 messages."""
    client = await DuplexClient.connect(url, timeout=10)
    await client.send_pcm(synth_audio(frames, 1))
    errors = []
    try:
        async with asyncio.timeout(10):
            async for event in client:
                if isinstance(event, ErrorEvent):
                    errors.append(event.message)
    finally:
        await client.close()
    return errors


def test_a_failed_step_ends_the_sessions_and_the_server_keeps_serving(models):
    engine = FailingEngine(2, fail_at=4)
    with live_server(models, engine=engine, max_sessions=2, send_tokens=True) as server:
        errors = asyncio.run(stream_until_error(server.url, 8))
        assert len(errors) == 1 and errors[0].startswith("server error: RuntimeError")
        later = asyncio.run(converse(server.url, synth_audio(6, 2), timeout=15))  # a new session works
        assert len(later.tokens) >= 5 and not later.errors
        assert healthz(server)[0] == 200
        assert engine.resets == 1
        metrics = server.service.metrics
        assert metrics.sessions_ended.labels("server_error")._value.get() == 1
    assert metrics.active_sessions._value.get() == 0


def test_an_engine_that_cannot_recover_stops_admission(models):
    engine = FailingEngine(1, fail_at=2, reset_works=False)
    with live_server(models, engine=engine, max_sessions=1) as server:
        errors = asyncio.run(stream_until_error(server.url, 4))
        assert len(errors) == 1 and errors[0].startswith("server error: RuntimeError")
        status, body = healthz(server)
        assert status == 503 and body["status"] == "unavailable"

        async def newcomer():
            async with asyncio.timeout(5):  # refused at once, not left hanging
                await DuplexClient.connect(server.url, timeout=5)

        with pytest.raises(ServerError, match="server error: RuntimeError: boom"):
            asyncio.run(newcomer())
        assert server.service.metrics.rejected.labels("server_error")._value.get() >= 1
