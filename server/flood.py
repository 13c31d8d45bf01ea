"""A connection flood against a running server, with a real-time canary call (issue 13's probe).

Used by ``duplex bench flood`` and by ``tests/test_server_flood.py``. The flood has two parts, each in a
spawned process of its own at a lower priority, since they stand for other machines:

* idle connections: they open a TCP connection and send nothing, or half a request head;
* fast senders: each opens a websocket session and sends 32 s of Opus audio as fast as it can, then
  holds the connection open.

Meanwhile the canary, in a process of its own too, is a well-behaved call: it streams silence in real
time and notes when each audio message of the answer arrives. Arrival times are CLOCK_MONOTONIC, which
processes share. The report says how long the canary's audio stopped and how the server answered the
attackers.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
import socket
import ssl
import time
from dataclasses import dataclass, field

import numpy as np

SPAWN = multiprocessing.get_context("spawn")
ATTACKER_NICE = 10  # the attackers' priority: other machines' CPU is not the server's
SENDER_FRAMES = 400  # 80 ms frames each fast sender sends (32 s of audio)
ANSWER_WAIT_SECONDS = 15.0  # once all idle connections are open, how long they wait for their answers


def encoded_stream(frames: int) -> list[bytes]:
    """Kind-1 messages of one Ogg/Opus stream of ``frames`` 80 ms frames of speech-like noise."""
    import sphn

    from duplex.server import protocol

    writer = sphn.OpusStreamWriter(24000)
    rng = np.random.default_rng(5)
    pages = [writer.append_pcm((0.1 * rng.standard_normal(1920)).astype(np.float32)) for _ in range(frames)]
    return [protocol.encode_audio(p) for p in pages if p]


async def fast_sender(url: str, stream: list[bytes], until: float, outcome: dict) -> None:
    """Send the stream far faster than real time, then hold the connection open until ``until``."""
    import websockets

    async def blast_and_hold(ws) -> None:
        for message in stream:
            await ws.send(message)  # blocks once the server stops reading (its receive buffer is full)
        await asyncio.sleep(until - time.monotonic())

    def count(key: str) -> None:
        outcome[key] = outcome.get(key, 0) + 1

    try:
        async with websockets.connect(url, max_size=None, open_timeout=10, close_timeout=1) as ws:
            count("accepted")
            try:
                await asyncio.wait_for(blast_and_hold(ws), max(0.01, until - time.monotonic()))
            except asyncio.TimeoutError:
                pass  # still sending or holding at the end of the flood
    except websockets.InvalidStatus as exc:
        count(f"http_{exc.response.status_code}")
    except (OSError, websockets.ConnectionClosed, asyncio.TimeoutError):
        count("closed")


def senders_main(url: str, senders: int, seconds: float, go, results) -> None:
    """The fast senders' process. They get ready (imports, encoding) first and flood when ``go`` is set,
    so that only the flood itself is measured."""
    os.nice(ATTACKER_NICE)
    stream = encoded_stream(SENDER_FRAMES)
    outcome: dict = {}
    results.put("ready")
    go.wait()

    async def main() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(fast_sender(url, stream, until, outcome) for _ in range(senders)))

    asyncio.run(main())
    results.put(outcome)


def idlers_main(host: str, port: int, count: int, tls: bool, go, results) -> None:
    """The idle connections' process: open them all, then collect each one's answer (408 and close?)."""
    os.nice(ATTACKER_NICE)
    results.put("ready")
    go.wait()
    sockets = open_idle(host, port, count, tls)
    deadline = time.monotonic() + ANSWER_WAIT_SECONDS
    answered = [answered_and_closed(sock, deadline) for sock in sockets]
    for sock in sockets:
        sock.close()
    results.put(answered)


def open_idle(host: str, port: int, count: int, tls: bool = False) -> list[socket.socket]:
    """``count`` connections (TLS ones for a wss:// server); every other one sends half a request head, the
    rest nothing."""
    context = ssl.create_default_context() if tls else None
    sockets = []
    for i in range(count):
        sock = socket.create_connection((host, port), timeout=10)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=host)
        if i % 2:
            sock.sendall(b"GET /api/chat HTTP/1.1\r\nHost: x\r\n")  # half a request head
        sockets.append(sock)
    return sockets


def answered_and_closed(sock: socket.socket, deadline: float) -> bool:
    """Whether the server answered 408 and closed by ``deadline`` (time.monotonic())."""
    data = b""
    try:
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except (OSError, ssl.SSLError):  # a timeout, a reset, a TLS error: not a clean 408
        return False
    return data.startswith(b"HTTP/1.1 408")


class ChildProcess:
    """``main(*args, results)`` in a spawned process of its own; it answers through ``results``."""

    def __init__(self, main, *args) -> None:
        self.results = SPAWN.Queue()
        self.process = SPAWN.Process(target=main, args=(*args, self.results), daemon=True)
        self.process.start()

    def get(self, timeout: float):
        """The next answer; fails at once if the process died without one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.is_alive() and self.results.empty():
                raise RuntimeError(f"flood process ended without an answer (exit code {self.process.exitcode})")
            try:
                return self.results.get(timeout=0.5)
            except queue.Empty:
                pass
        raise TimeoutError(f"no answer from a flood process in {timeout:.0f} s")

    def finish(self, timeout: float):
        """The last answer, then the process is gone."""
        try:
            return self.get(timeout)
        finally:
            self.process.join(10)
            if self.process.is_alive():
                self.process.kill()


class Attackers(ChildProcess):
    """A process running ``main(*args, go, results)``, started (and made ready) before the flood."""

    def __init__(self, main, *args, seconds: float) -> None:
        self.seconds = seconds
        self.go = SPAWN.Event()
        super().__init__(main, *args, self.go)
        if self.get(120) != "ready":
            raise RuntimeError("a flood process did not get ready")

    def start(self) -> None:
        self.go.set()

    def outcome(self):
        """What the process reports once its part of the flood is over."""
        return self.finish(self.seconds + 120)


def canary_main(url: str, api_key: str | None, frames, stop, results) -> None:
    """The canary's process: a real-time call until ``stop`` is set; reports its audio arrival times."""
    arrivals: list[float] = []

    async def main() -> None:
        stopped = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():
                await asyncio.sleep(0.05)
            stopped.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await canary(url, arrivals, stopped, frames, api_key)
        finally:
            watcher.cancel()

    try:
        asyncio.run(main())
        results.put(("ok", arrivals))
    except BaseException as exc:  # noqa: BLE001 - reported by stop()
        results.put(("error", repr(exc)))


class CanaryCall(ChildProcess):
    """A real-time call in a process of its own: neither the attackers nor the caller's threads share
    its interpreter."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self._frames, self._stop = SPAWN.Value("i", 0), SPAWN.Event()
        super().__init__(canary_main, url, api_key, self._frames, self._stop)
        self.arrivals: list[float] = []

    @property
    def frames(self) -> int:
        """Audio frames received so far."""
        return self._frames.value

    def stop(self) -> None:
        self._stop.set()
        status, value = self.finish(30)
        if status != "ok":
            raise RuntimeError(f"the canary call failed: {value}")
        self.arrivals = value


async def canary(url: str, arrivals: list[float], stop: asyncio.Event, frames=None, api_key: str | None = None) -> None:
    """Send silence in real time and note each audio message's arrival until ``stop`` is set."""
    from duplex.client.client import AudioEvent, DuplexClient

    client = await DuplexClient.connect(url, timeout=30, api_key=api_key)
    start = time.monotonic()

    async def send() -> None:
        index = 0
        while True:
            await client.send_pcm(np.zeros(1920, np.float32))
            index += 1
            await asyncio.sleep(max(0.0, start + index * 0.08 - time.monotonic()))

    async def receive() -> None:
        async for event in client:
            if isinstance(event, AudioEvent):
                arrivals.append(time.monotonic())
                if frames is not None:
                    frames.value += 1

    tasks = [asyncio.ensure_future(send()), asyncio.ensure_future(receive())]
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                task.result()  # the call failed or ended before it was stopped
        if not stopped.done():
            raise RuntimeError("the canary call ended on its own")
    finally:
        for task in (*tasks, stopped):
            task.cancel()
        await asyncio.gather(*tasks, stopped, return_exceptions=True)
        await client.close()


@dataclass
class FloodReport:
    """What one flood showed."""

    seconds: float  # from the go to the attackers' last report
    senders: dict  # fast senders' outcomes: accepted / http_<status> / closed -> count
    idle_answered: list[bool]  # per idle connection: answered 408 and closed
    arrivals: list[float] = field(default_factory=list)  # the canary's audio, during the flood and 1 s around it
    measured: dict = field(default_factory=dict)  # the caller's measurements before/after (e.g. RSS)

    @property
    def gaps_ms(self) -> np.ndarray:
        return 1000 * np.diff(self.arrivals)

    @property
    def max_gap_ms(self) -> float:
        return float(self.gaps_ms.max()) if len(self.arrivals) > 1 else float("inf")


async def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the canary call got no audio")
        await asyncio.sleep(0.05)


async def run_flood(url: str, host: str, port: int, idle: int, senders: int, seconds: float,
                    measure=None, api_key: str | None = None) -> FloodReport:
    """Warm the server up with one call, then flood it while the canary talks. ``measure()`` (if given) is
    called before the flood and 2 s after it; its results are in ``report.measured``. Every process it
    started is gone when it returns or raises."""
    children: list[ChildProcess] = []

    def started(child: ChildProcess) -> ChildProcess:
        children.append(child)
        return child

    try:
        warm = started(CanaryCall(url, api_key))
        await wait_until(lambda: warm.frames > 10, 60)
        await asyncio.to_thread(warm.stop)
        await asyncio.sleep(1.0)
        measured = {"before": measure() if measure else None}
        flooders = started(await asyncio.to_thread(Attackers, senders_main, url, senders, seconds, seconds=seconds))
        idlers = started(await asyncio.to_thread(Attackers, idlers_main, host, port, idle, url.startswith("wss:"),
                                                 seconds=seconds))
        call = started(CanaryCall(url, api_key))
        await wait_until(lambda: call.frames > 5, 60)
        start = time.monotonic()
        idlers.start()
        flooders.start()
        answered = await asyncio.to_thread(idlers.outcome)
        outcome = await asyncio.to_thread(flooders.outcome)
        end = time.monotonic()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(call.stop)
        await asyncio.sleep(2.0)
        measured["after"] = measure() if measure else None
    finally:
        for child in children:
            if child.process.is_alive():
                child.process.kill()
    kept = [t for t in call.arrivals if start - 1.0 <= t <= end + 1.0]  # the flood and its aftermath
    return FloodReport(end - start, outcome, answered, kept, measured)
