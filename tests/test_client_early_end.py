"""A call that ends before all audio was answered fails loudly: `duplex talk` exits 1 with a clear message,
and the Python client ends its event stream with an ErrorEvent (issue 14, item 1, client side).

The server here is a minimal fake speaking the protocol (websockets): it answers some frames, then closes
(1011, as a keepalive timeout would), or drops the TCP connection, or stops answering and closes 1000."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest
import sphn
import websockets
from websockets.asyncio.server import serve

from duplex.cli import main as duplex_main
from duplex.client.audio import write_wav
from duplex.client.client import DuplexClient, ErrorEvent
from duplex.server import protocol


class FakeServer:
    """Answers each audio message with an audio page until ``answer`` pages, then ends as ``ending`` says."""

    def __init__(self, answer: int, ending: str) -> None:
        self.answer, self.ending = answer, ending
        self.port = None
        self._ready = threading.Event()
        self._stop: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _handler(self, ws) -> None:
        await ws.send(protocol.encode_handshake())
        writer, reader = sphn.OpusStreamWriter(24000), sphn.OpusStreamReader(24000)
        answered = 0
        async for message in ws:
            pcm = reader.append_bytes(message[1:])
            if len(pcm) == 0:
                continue
            ogg = writer.append_pcm(np.zeros(len(pcm), np.float32))
            if ogg:
                await ws.send(protocol.encode_audio(ogg))
            answered += 1
            if answered >= self.answer:
                break
        if self.ending == "close_1011":
            await ws.close(1011, "keepalive ping timeout")
        elif self.ending == "drop":
            ws.transport.abort()
        else:  # "close_1000": a normal close with no error and unanswered audio
            await ws.close()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        async with serve(self._handler, "127.0.0.1", 0) as server:
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stop

    def __enter__(self) -> "FakeServer":
        self.thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/chat"


@pytest.fixture
def long_wav(tmp_path):
    path = tmp_path / "long.wav"
    write_wav(path, (0.1 * np.sin(np.arange(60 * 1920) / 10.0)).astype(np.float32))  # 60 frames, 4.8 s
    return path


@pytest.mark.parametrize("ending, expected", [
    ("close_1011", "code 1011 (keepalive ping timeout)"),
    ("drop", "the connection to the server was lost"),
])
def test_talk_fails_loudly_when_the_server_ends_the_call_early(long_wav, tmp_path, capsys, ending, expected):
    with FakeServer(answer=10, ending=ending) as fake:
        code = duplex_main(["talk", "--url", fake.url, "--input", str(long_wav), "--output",
                            str(tmp_path / "out.wav"), "--fast", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "duplex talk: the server ended the session:" in err and expected in err
    assert "Traceback" not in err


def test_talk_fails_when_the_audio_was_not_all_answered(long_wav, tmp_path, capsys):
    """The fake answers 10 frames, then closes normally without an error: still a failure."""
    with FakeServer(answer=10, ending="close_1000") as fake:
        code = duplex_main(["talk", "--url", fake.url, "--input", str(long_wav), "--fast", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "the server closed the connection before the call ended: code 1000" in err


def test_talk_unanswered_rule():
    from duplex.client.cli import unanswered

    assert unanswered(60, 59 * 1920, 60) is None
    assert unanswered(60, 56 * 1920, 60) is None  # the acoustic delay plus the slack
    assert "10 of 59 frames came back" in unanswered(60, 10 * 1920, 60)
    assert "after 20 of 60 frames were sent" in unanswered(20, 19 * 1920, 60)


def test_python_client_ends_with_an_error_event_when_the_server_closes_early():
    async def scenario():
        with FakeServer(answer=3, ending="close_1011") as fake:
            client = await DuplexClient.connect(fake.url, timeout=10)
            for _ in range(5):
                await client.send_pcm(np.zeros(1920, np.float32))
            events = []
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(10):
                    async for event in client:
                        events.append(event)
            await client.close()
            return client, events

    client, events = asyncio.run(scenario())
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert len(errors) == 1 and "code 1011" in errors[0].message
    assert client.ended_unexpectedly == errors[0].message


def test_python_client_closing_itself_is_not_an_error():
    async def scenario():
        with FakeServer(answer=100, ending="close_1000") as fake:
            client = await DuplexClient.connect(fake.url, timeout=10)
            await client.send_pcm(np.zeros(3 * 1920, np.float32))
            await client.close()
            return client, [event async for event in client]

    client, events = asyncio.run(scenario())
    assert client.ended_unexpectedly is None
    assert not [e for e in events if isinstance(e, ErrorEvent)]


def test_an_http_refusal_carries_the_server_reason():
    """A 401/403/429 before the upgrade reaches the caller as 'HTTP 401: <the server's line>'."""
    from duplex.client.client import ServerError

    async def handler(connection, request):
        return connection.respond(401, "an API key is required (Authorization: Bearer KEY or ?api_key=KEY)\n")

    async def scenario():
        async with serve(lambda ws: None, "127.0.0.1", 0, process_request=handler) as server:
            port = server.sockets[0].getsockname()[1]
            with pytest.raises(ServerError, match=r"HTTP 401: an API key is required"):
                await DuplexClient.connect(f"ws://127.0.0.1:{port}/api/chat", timeout=5)

    asyncio.run(scenario())
    assert websockets  # the library the fake uses is the client's own
