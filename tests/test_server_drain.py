"""Graceful drain with real clients against a `duplex serve --demo` subprocess (issue 13, items 5 and 8).

SIGTERM: /readyz turns 503, the queued client is told to reconnect elsewhere (kind 5), a newcomer is
refused, the active call goes on until --drain-seconds, then hears "server restarting"; exit code 0.
A second signal ends at once."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from server_harness import spawn_serve

from duplex.client.client import AudioEvent, DuplexClient, ErrorEvent, ServerError


class DemoServer:
    """`duplex serve --demo` on a free loopback port; always killed at exit."""

    def __init__(self, *extra: str) -> None:
        self.process, self.port, self.lines = spawn_serve(
            "--demo", "--host", "127.0.0.1", "--port", "0", "--threads", "1", "--device", "cpu", *extra, wait_s=90)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/chat"

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def __enter__(self) -> "DemoServer":
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


async def realtime_call(url: str, log: list, stop: asyncio.Event) -> None:
    """Stream silence in real time and record (time, event) until the server ends the call."""
    client = await DuplexClient.connect(url, timeout=20)

    async def send() -> None:
        while not stop.is_set():
            try:
                await client.send_pcm(np.zeros(1920, np.float32))
            except ServerError:
                return
            await asyncio.sleep(0.08)

    sender = asyncio.ensure_future(send())
    try:
        async for event in client:
            log.append((time.monotonic(), event))
            if isinstance(event, ErrorEvent):
                return
    finally:
        sender.cancel()
        await client.close()


async def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def test_sigterm_drains_then_restarts_and_exits_0():
    with DemoServer("--max-sessions", "1", "--max-queue", "2", "--drain-seconds", "3") as server:
        info = server.get("/api/info")[1]
        assert info["demo"] is True and "noise" in info["model"]

        async def scenario():
            log, stop = [], asyncio.Event()
            active = asyncio.ensure_future(realtime_call(server.url, log, stop))
            await wait_for(lambda: any(isinstance(e, AudioEvent) for _, e in log))
            queued = asyncio.ensure_future(DuplexClient.connect(server.url, timeout=20))
            await wait_for(lambda: server.get("/api/capacity")[1]["queued"] == 1)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(ServerError, match="server draining: reconnect to another server"):
                await queued
            await wait_for(lambda: server.get("/readyz")[0] == 503)
            assert server.get("/readyz")[1]["status"] == "draining"
            assert server.get("/healthz")[0] == 200
            with pytest.raises(ServerError, match="server draining"):
                await DuplexClient.connect(server.url, timeout=10)
            await asyncio.wait_for(active, 20)
            stop.set()
            return log, signalled

        log, signalled = asyncio.run(scenario())
        code = server.process.wait(20)
    audio_after = [t for t, e in log if isinstance(e, AudioEvent) and t > signalled + 2.0]
    assert audio_after, "the active call did not go on during the drain"
    ended_at, last = log[-1]
    assert isinstance(last, ErrorEvent) and last.message == "server restarting"
    assert 2.5 <= ended_at - signalled <= 8.0
    assert code == 0, "".join(server.lines)
    assert "Traceback" not in "".join(server.lines)


def test_a_second_signal_ends_at_once():
    with DemoServer("--max-sessions", "1", "--drain-seconds", "60") as server:
        async def scenario():
            log, stop = [], asyncio.Event()
            active = asyncio.ensure_future(realtime_call(server.url, log, stop))
            await wait_for(lambda: any(isinstance(e, AudioEvent) for _, e in log))
            server.process.send_signal(signal.SIGTERM)
            await wait_for(lambda: server.get("/readyz")[0] == 503)
            second = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(active, 20)
            return log, second

        log, second = asyncio.run(scenario())
        code = server.process.wait(20)
    ended_at, last = log[-1]
    assert isinstance(last, ErrorEvent) and last.message == "server restarting"
    assert ended_at - second < 3.0
    assert code == 0, "".join(server.lines)
