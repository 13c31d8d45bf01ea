"""A queued client that leaves (or breaks the protocol) in the same turn its slot is granted."""

from __future__ import annotations

import asyncio

import pytest
from server_harness import load_tiny_models
from starlette.websockets import WebSocketState

from duplex.server import protocol
from duplex.server.service import DuplexService, ServerSettings
from duplex.server.session import Session


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


class HeldWebSocket:
    """Reads nothing until ``deliver`` hands it one message; records what the server sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.client = None
        self.query_params: dict = {}
        self.application_state = WebSocketState.CONNECTED
        self.closed = False
        self.waiting = False
        self._message: dict | None = None
        self._arrived = asyncio.Event()

    def deliver(self, message: dict) -> None:
        self._message = message
        self._arrived.set()

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict:
        self.waiting = True
        await self._arrived.wait()
        self._arrived.clear()
        message, self._message = self._message, None
        return message

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)

    async def close(self) -> None:
        self.closed = True
        self.application_state = WebSocketState.DISCONNECTED


BAD_INPUT = {"type": "websocket.receive", "text": "hello"}  # text frames are a protocol error
DISCONNECT = {"type": "websocket.disconnect", "code": 1000}


@pytest.mark.parametrize(("message", "reason"), [(BAD_INPUT, "bad_input"), (DISCONNECT, "left_queue")])
def test_a_client_leaving_as_its_slot_is_granted_does_not_start(models, message, reason):
    async def main():
        service = DuplexService(models, ServerSettings(max_sessions=1, max_queue=4, max_session_seconds=1,
                                                       torch_threads=1))
        assert service.admission.try_acquire()  # the only slot is taken: the client queues
        ws = HeldWebSocket()
        session = asyncio.ensure_future(Session(ws, service).run())
        for _ in range(100):
            if ws.waiting and service.admission.queue_length == 1:
                break
            await asyncio.sleep(0)
        assert ws.waiting and service.admission.queue_length == 1
        service.admission.release()  # the slot goes to the queued client ...
        ws.deliver(message)  # ... in the same turn as its bad message / hang-up arrives
        await asyncio.wait_for(session, 5)
        return service, ws

    service, ws = asyncio.run(main())
    assert service.metrics.rejected.labels(reason)._value.get() == 1
    assert service.metrics.sessions_ended.labels("time_limit")._value.get() == 0
    assert service.admission.active == 0 and service.admission.queue_length == 0
    assert service.scheduler.active == 0
    assert protocol.encode_handshake() not in ws.sent
    if reason == "bad_input":
        assert ws.sent[-1][0] == protocol.MessageKind.ERROR and ws.closed
