"""The handshake gate (duplex.server.handshake_gate): new connections' first requests, spread over loop
iterations so that a burst of them cannot hold up a conversation's audio (issue 13, item 3)."""

from __future__ import annotations

import asyncio
import http.client
import time

import pytest
from server_harness import live_server, load_tiny_models
from test_server_transport import raw_http

from duplex.server.handshake_gate import HandshakeGate, gate_for


class Connection:
    """Costs ``cost`` seconds of CPU when released; notes the order."""

    def __init__(self, name: int, log: list, cost: float) -> None:
        self.name, self.log, self.cost = name, log, cost

    def release_gate(self) -> None:
        end = time.perf_counter() + self.cost
        while time.perf_counter() < end:
            pass
        self.log.append(self.name)


def test_a_burst_is_released_in_order_a_budget_at_a_time_with_other_callbacks_in_between():
    async def main():
        loop = asyncio.get_running_loop()
        gate, released, seen_by_audio = HandshakeGate(loop, budget=0.004), [], []
        for i in range(40):  # 40 ms of handshakes arrive in one loop iteration
            gate.enter(Connection(i, released, cost=0.001))
        for _ in range(3):  # e.g. audio deliveries, ready meanwhile
            loop.call_soon(lambda: seen_by_audio.append(len(released)))
            await asyncio.sleep(0)
        while len(released) < 40:
            await asyncio.sleep(0)
        return released, seen_by_audio, gate

    released, seen_by_audio, gate = asyncio.run(main())
    assert released == list(range(40)) and gate.peak == 40 and not gate.waiting
    assert seen_by_audio[0] <= 6  # the first delivery waited for one budget (4 ms), not for all 40 ms
    assert all(b - a <= 6 for a, b in zip(seen_by_audio, seen_by_audio[1:]))


def test_an_idle_loop_releases_everything_without_pause():
    async def main():
        gate, released = HandshakeGate(asyncio.get_running_loop(), budget=1.0), []
        for i in range(100):
            gate.enter(Connection(i, released, cost=0.0))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return released

    assert asyncio.run(main()) == list(range(100))  # one callback: well within its budget


def test_a_connection_that_leaves_is_not_released():
    async def main():
        gate, released = HandshakeGate(asyncio.get_running_loop()), []
        connections = [Connection(i, released, cost=0.0) for i in range(3)]
        for connection in connections:
            gate.enter(connection)
        gate.leave(connections[1])
        gate.leave(connections[1])  # twice is fine
        await asyncio.sleep(0.01)
        return released

    assert asyncio.run(main()) == [0, 2]


def test_each_event_loop_has_its_own_gate():
    async def get():
        return gate_for(asyncio.get_running_loop())

    async def same():
        return gate_for(asyncio.get_running_loop()) is gate_for(asyncio.get_running_loop())

    assert asyncio.run(same())
    assert asyncio.run(get()) is not asyncio.run(get())


# ------------------------------------------------------------------ the transport's use of it
@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


def exchange(server, data: bytes) -> tuple[bytes, float]:
    """``data`` on a fresh connection: what came back until the server closed, and how long that took."""
    started = time.monotonic()
    answer = raw_http(server, data)
    return answer, time.monotonic() - started


def test_a_request_held_at_the_gate_is_judged_at_its_deadline(models, monkeypatch):
    """A gate that never gets its turn (an overloaded loop, in the extreme): at the head deadline a complete
    request is answered after all, and only an incomplete one gets 408."""
    monkeypatch.setattr(HandshakeGate, "_release_some", lambda self: None)
    with live_server(models, max_sessions=1, handshake_seconds=0.5) as server:
        complete, waited = exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert complete.startswith(b"HTTP/1.1 200") and 0.4 < waited < 3.0
        partial, waited = exchange(server, b"GET /healthz HTTP/1.1\r\nHo")
        assert partial.startswith(b"HTTP/1.1 408") and waited < 3.0


def test_only_a_connections_first_request_waits_at_the_gate(models, monkeypatch):
    entered = []
    original = HandshakeGate.enter
    monkeypatch.setattr(HandshakeGate, "enter", lambda self, connection: entered.append(1) or original(self, connection))
    with live_server(models, max_sessions=1, handshake_seconds=2.0) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        for _ in range(3):  # one keep-alive connection, three requests, each sent after the last answer
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            assert response.status == 200
            response.read()
        connection.close()
    assert len(entered) == 1
