"""Async Python client of the duplex / Kyutai websocket protocol.

```python
client = await DuplexClient.connect("ws://localhost:8998/api/chat", params={"text_seed": 1})
await client.send_pcm(pcm)             # float32 [N] at 24 kHz, any N
async for event in client:             # AudioEvent, TextEvent, MetadataEvent, ErrorEvent
    ...
await client.close()
```
``connect`` returns once the server's handshake arrived (after any time spent in the queue;
queue positions reach ``on_metadata`` and the event stream) and raises :class:`ServerError`
when the server answers with a kind-5 error instead (busy, bad parameters, shutting down).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Mapping

import numpy as np
import sphn
import websockets
from websockets.asyncio.client import ClientConnection

from duplex.server import protocol
from duplex.server.protocol import MessageKind

logger = logging.getLogger(__name__)

SAMPLE_RATE = protocol.SAMPLE_RATE
FRAME_SIZE = protocol.FRAME_SIZE


class ServerError(Exception):
    """The server sent a kind-5 error (or closed) instead of serving the session."""


@dataclass(frozen=True)
class AudioEvent:
    pcm: np.ndarray  # [N] float32 at 24 kHz


@dataclass(frozen=True)
class TextEvent:
    text: str


@dataclass(frozen=True)
class MetadataEvent:
    data: dict


@dataclass(frozen=True)
class ErrorEvent:
    message: str


Event = AudioEvent | TextEvent | MetadataEvent | ErrorEvent


def chat_url(url: str, params: Mapping[str, object] | None) -> str:
    """``url`` with ``params`` appended as query parameters."""
    if not params:
        return url
    query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
    return f"{url}{'&' if '?' in url else '?'}{query}"


class DuplexClient:
    """One conversation with a duplex server."""

    def __init__(self, ws: ClientConnection, handshake: tuple[int, int], early: list[Event]) -> None:
        self.ws = ws
        self.protocol_version, self.model_version = handshake
        self.session_metadata: dict | None = None
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        for event in early:
            self._events.put_nowait(event)
        self._opus_out = sphn.OpusStreamWriter(SAMPLE_RATE)
        self._opus_in = sphn.OpusStreamReader(SAMPLE_RATE)
        self._pending = np.zeros(0, dtype=np.float32)
        self._closing = False  # close() was called: the end is ours
        self._error_seen = False  # the server sent a kind-5 error: the end is explained
        # Set when the server closed (or the link broke) without a kind-5 error before close() was called;
        # the event stream then ends with an ErrorEvent carrying this text.
        self.ended_unexpectedly: str | None = None
        self._reader = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def connect(cls, url: str, params: Mapping[str, object] | None = None,
                      on_metadata: Callable[[dict], None] | None = None,
                      timeout: float | None = None, ssl=None, api_key: str | None = None) -> "DuplexClient":
        """Open a session; waits (also while queued) for the handshake, at most ``timeout`` seconds.

        ``ssl``: an ``ssl.SSLContext`` for a wss:// URL (None: the system's default verification).
        ``api_key``: sent as ``Authorization: Bearer KEY`` (servers started with ``--api-key``).
        """
        if ssl is not None and not url.lower().startswith("wss://"):
            raise ValueError(f"an ssl context was given but {url!r} is not a wss:// URL")
        options: dict = {"ssl": ssl} if ssl is not None else {}  # websockets refuses ssl=None for wss://
        if api_key:
            options["additional_headers"] = {"Authorization": f"Bearer {api_key}"}
        try:
            ws = await websockets.connect(chat_url(url, params), max_size=None, **options)
        except websockets.InvalidStatus as exc:  # refused before the upgrade: 401, 403, 429, ...
            raise ServerError(f"cannot connect to {url}: {_refusal_text(exc)}") from exc
        except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            raise ServerError(f"cannot connect to {url}: {exc}") from exc
        try:
            handshake, early = await asyncio.wait_for(_await_handshake(ws, on_metadata), timeout)
        except BaseException:
            await ws.close()
            raise
        return cls(ws, handshake, early)

    # ------------------------------------------------------------------ sending
    async def send_pcm(self, pcm: np.ndarray) -> int:
        """Encode float32 mono 24 kHz audio to Ogg/Opus and send it; returns frames sent.

        Audio is sent in whole 80 ms frames; a remainder is kept for the next call. Raises ServerError
        (saying why) once the connection is closed.
        """
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        pcm = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        frames = pcm.size // FRAME_SIZE
        for i in range(frames):
            ogg = self._opus_out.append_pcm(pcm[i * FRAME_SIZE:(i + 1) * FRAME_SIZE])
            if ogg:
                try:
                    await self.ws.send(protocol.encode_audio(ogg))
                except websockets.ConnectionClosed as exc:
                    raise ServerError(self.ended_unexpectedly or self._close_description()) from exc
        self._pending = pcm[frames * FRAME_SIZE:].copy()
        return frames

    async def send_raw(self, data: bytes | str) -> None:
        """Send one websocket message as is (for tests of bad input)."""
        await self.ws.send(data)

    # ------------------------------------------------------------------ receiving
    def __aiter__(self) -> AsyncIterator[Event]:
        return self.events()

    async def events(self) -> AsyncIterator[Event]:
        """Events until the connection closes."""
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)  # later iterations end too
                return
            yield event

    async def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None once the connection is closed."""
        event = await asyncio.wait_for(self._events.get(), timeout)
        if event is None:
            self._events.put_nowait(None)
        return event

    async def _read_loop(self) -> None:
        try:
            async for message in self.ws:
                event = self._to_event(message)
                if event is not None:
                    self._events.put_nowait(event)
        except websockets.ConnectionClosed:
            pass
        except Exception:  # noqa: BLE001 - a broken stream ends the event iterator
            logger.exception("duplex client: receiving failed")
            self._end_unexpectedly("the stream from the server broke")
        finally:
            if not self._closing and not self._error_seen:
                self._end_unexpectedly(self._close_description())
            self._events.put_nowait(None)

    def _close_description(self) -> str:
        """Why the connection ended, from the close frames (or their absence)."""
        received = self.ws.protocol.close_rcvd
        if received is None:
            return "the connection to the server was lost (no close frame)"
        reason = f" ({received.reason})" if received.reason else ""
        return f"the server closed the connection before the call ended: code {received.code}{reason}"

    def _end_unexpectedly(self, description: str) -> None:
        """The server ended the call without a kind-5 error (or the link broke): say so, loudly."""
        if self.ended_unexpectedly is None:
            self.ended_unexpectedly = description
            logger.warning("duplex client: %s", description)
            self._events.put_nowait(ErrorEvent(description))

    def _to_event(self, message: bytes | str) -> Event | None:
        if isinstance(message, str) or not message:
            return None
        parsed = protocol.parse_message(message, max_bytes=len(message))
        if parsed.kind is MessageKind.AUDIO:
            pcm = self._opus_in.append_bytes(parsed.payload)
            return AudioEvent(np.asarray(pcm, dtype=np.float32)) if len(pcm) else None
        if parsed.kind is MessageKind.TEXT:
            return TextEvent(parsed.payload.decode("utf-8", errors="replace"))
        if parsed.kind is MessageKind.METADATA:
            data = protocol.decode_metadata(parsed.payload)
            if data.get("type") == "session":
                self.session_metadata = data
            return MetadataEvent(data)
        if parsed.kind is MessageKind.ERROR:
            self._error_seen = True
            return ErrorEvent(parsed.payload.decode("utf-8", errors="replace"))
        return None

    async def close(self) -> None:
        """Close the connection (the server frees the session)."""
        self._closing = True
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> "DuplexClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()


def _refusal_text(exc) -> str:
    """``HTTP 401: an API key is required ...``: the status and the server's one-line reason."""
    response = getattr(exc, "response", None)
    if response is None:
        return str(exc)
    body = bytes(response.body or b"").decode("utf-8", errors="replace").strip().splitlines()
    return f"HTTP {response.status_code}" + (f": {body[0][:300]}" if body else "")


async def _await_handshake(ws: ClientConnection, on_metadata) -> tuple[tuple[int, int], list[Event]]:
    """Read until the handshake; metadata before it (queue positions) is kept and reported."""
    early: list[Event] = []
    while True:
        try:
            message = await ws.recv()
        except websockets.ConnectionClosed as exc:
            raise ServerError(f"the server closed the connection before the session started ({exc})") from exc
        if isinstance(message, str) or not message:
            continue
        parsed = protocol.parse_message(message, max_bytes=len(message))
        if parsed.kind is MessageKind.HANDSHAKE:
            return protocol.decode_handshake(parsed.payload), early
        if parsed.kind is MessageKind.ERROR:
            raise ServerError(parsed.payload.decode("utf-8", errors="replace"))
        if parsed.kind is MessageKind.METADATA:
            data = protocol.decode_metadata(parsed.payload)
            early.append(MetadataEvent(data))
            if on_metadata is not None:
                on_metadata(data)
