"""A session's way in: the socket reader, Ogg/Opus decode, framing, the receive buffer and the feeder.

The *reader* reads the socket continuously, parses each message (:mod:`duplex.server.protocol`) and
keeps kind-1 Ogg/Opus messages, undecoded, in a receive buffer bounded in bytes
(:data:`RECEIVE_BUFFER_BYTES`, about 8 minutes of audio at 32 kbit/s); the *feeder* decodes them,
cuts them into 80 ms frames and pushes those to the scheduler, which applies backpressure (when the
buffer is empty and the slot's inbox has room, the reader does that itself, without the feeder's
event-loop iteration: the common case of a real-time client). So the
socket is read (pongs, hang-ups) even while the model is far behind a client faster than real time.
Only a client more than the buffer ahead is throttled (the reader stops reading); since the
transport's keepalive cannot see pongs then, such a client is ended with a kind-5 error after
:data:`MAX_THROTTLED_SECONDS` instead of dying of a keepalive timeout.
While a client is queued its audio is not decoded: only the Opus header pages are kept (so that
the stream decodes once the session starts), the rest is discarded unread. No message may decode
to more than :data:`MAX_DECODED_SECONDS_PER_MESSAGE` (checked from the packets' headers before
decoding: a 150-byte page can otherwise carry seconds of audio).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import numpy as np
import sphn

from duplex.server import protocol
from duplex.server.frames import FrameAssembler, OggFormatError, ogg_header_pages, ogg_opus_seconds
from duplex.server.protocol import MessageKind, ProtocolError

logger = logging.getLogger(__name__)

# Undecoded audio a session buffers between its socket and the scheduler. Beyond it the session stops
# reading its socket: a hang-up is seen late only once a client is more than this ahead of the model.
RECEIVE_BUFFER_BYTES = 2 << 20
RECEIVE_BUFFER_FRAMES = 250  # (kept for older imports; the receive buffer is bounded in bytes)
# uvicorn's keepalive closes a connection whose pong it has not read for ping interval + timeout (20 + 20 s
# by default); a throttled reader reads nothing, so a session throttled this long ends with a clear error.
MAX_THROTTLED_SECONDS = 15.0
MAX_DECODED_SECONDS_PER_MESSAGE = 2.0  # a client sends one 80 ms frame per message
MAX_HEADER_PAGES = 4  # header pages kept while queued (a stream has 2)
# A queue with messages waiting returns them without yielding to the event loop: the loops below yield every
# this many messages, so that one client's burst cannot hold the loop (and stall the others' audio).
YIELD_EVERY_MESSAGES = 8


class Inbound:
    """Reads, decodes and frames one client's audio."""

    def __init__(self, session) -> None:
        self.session = session
        self.service = session.service
        self.received: asyncio.Queue[tuple[bytes, float, float]] = asyncio.Queue()  # (Ogg, arrival, seconds)
        self.received_bytes = 0  # bytes in ``received``
        self.received_seconds = 0.0  # audio in ``received``
        self.space = asyncio.Event()  # set when the receive buffer has room again
        self.buffer_bytes = RECEIVE_BUFFER_BYTES
        self.max_throttled_seconds = MAX_THROTTLED_SECONDS
        self.opus_in = sphn.OpusStreamReader(self.service.sample_rate)
        self.frames = FrameAssembler(self.service.frame_size)
        self.discarded_bytes = 0  # audio bytes received while queued and never decoded
        self.feeding = False  # the feeder is decoding or pushing a message (see on_message)
        self._headers: list[bytes] = []  # Opus header pages received while queued

    def parse(self, message: dict) -> protocol.Message:
        data = message.get("bytes")
        if data is None:
            raise ProtocolError("text frames are not supported: send binary messages (kind byte + payload)")
        self.session.record.bytes_in += len(data)
        self.service.metrics.bytes.labels("in").inc(len(data))
        return protocol.parse_message(data, self.service.settings.max_message_bytes)

    def audio_seconds(self, ogg: bytes) -> float:
        """Seconds the message would decode to; ProtocolError when it is not Ogg or over the cap."""
        try:
            seconds = ogg_opus_seconds(ogg)
        except OggFormatError as exc:
            raise ProtocolError(f"audio is not a valid Ogg/Opus stream: {exc}") from None
        if seconds > MAX_DECODED_SECONDS_PER_MESSAGE:
            raise ProtocolError(f"one audio message may carry at most {MAX_DECODED_SECONDS_PER_MESSAGE:g} s "
                                f"of audio, this one carries {seconds:.2f} s")
        return seconds

    def decode(self, ogg: bytes) -> np.ndarray:
        """Ogg/Opus bytes -> [N] float32 PCM (N may be 0), within the per-message cap."""
        self.audio_seconds(ogg)
        try:
            pcm = self.opus_in.append_bytes(ogg)
        except Exception as exc:  # noqa: BLE001 - sphn raises ValueError/OSError for bad streams
            raise ProtocolError(f"audio is not a valid Ogg/Opus stream: {exc}") from None
        return np.asarray(pcm, dtype=np.float32)

    def keep_while_queued(self, ogg: bytes) -> None:
        """A queued client's audio: keep the stream's header pages, discard the rest undecoded."""
        seconds = self.audio_seconds(ogg)
        self.service.metrics.frames_dropped.labels("in").inc(seconds * self.service.sample_rate
                                                            / self.service.frame_size)
        headers = ogg_header_pages(ogg)
        if len(self._headers) + len(headers) > MAX_HEADER_PAGES:
            raise ProtocolError("audio stream sends Opus headers again and again")
        self._headers.extend(headers)
        self.discarded_bytes += len(ogg) - sum(len(p) for p in headers)

    def start_stream(self) -> None:
        """The session starts: decode the header pages kept while queued."""
        for page in self._headers:
            self.decode(page)
        self._headers.clear()

    async def read_while_queued(self) -> str | None:
        """Until the client disconnects (None) or breaks the protocol (the error): read its messages."""
        for count in itertools.count(1):
            message = await self.session.ws.receive()
            if message["type"] == "websocket.disconnect":
                return None
            if count % YIELD_EVERY_MESSAGES == 0:
                await asyncio.sleep(0)
            try:
                parsed = self.parse(message)
                if parsed.kind is MessageKind.AUDIO:
                    self.keep_while_queued(parsed.payload)
            except ProtocolError as exc:
                return str(exc)

    async def receive_loop(self) -> None:
        """The reader: socket -> receive buffer, until the client leaves or breaks the protocol."""
        session = self.session
        try:
            for count in itertools.count(1):
                if session.done.is_set():
                    return
                message = await session.ws.receive()
                if message["type"] == "websocket.disconnect":
                    session.finish("client_closed")
                    return
                await self.on_message(message)
                if count % YIELD_EVERY_MESSAGES == 0:
                    await asyncio.sleep(0)
        except ProtocolError as exc:
            session.finish("bad_input", str(exc))
        except Exception:  # noqa: BLE001 - a broken socket ends only this session
            logger.debug("session %s: receive failed", session.id, exc_info=True)
            session.finish("client_closed")

    async def on_message(self, message: dict) -> None:
        parsed = self.parse(message)
        if parsed.kind is MessageKind.AUDIO:
            seconds = self.audio_seconds(parsed.payload)  # checked before it is buffered
            if self._can_feed_now(seconds):
                # Nothing waits before it and the scheduler has room: decode and push it now. Through the
                # buffer it would wait for the feeder's turn, one more event-loop iteration (tens of
                # milliseconds while the loop is busy, e.g. in a connection flood).
                try:
                    await self._feed(parsed.payload, time.perf_counter())
                except ProtocolError:
                    raise
                except Exception as exc:  # noqa: BLE001 - as in the feeder: ends only this session
                    logger.exception("session %s: feeding the scheduler failed", self.session.id)
                    self.session.finish("server_error", f"server error: {type(exc).__name__}")
                return
            self.received.put_nowait((parsed.payload, time.perf_counter(), seconds))
            self.received_bytes += len(parsed.payload)
            self.received_seconds += seconds
            if self.received_bytes > self.buffer_bytes:
                await self._throttled()
        # control, ping, client-sent handshake/text/metadata/error and unknown kinds: ignored

    def _can_feed_now(self, seconds: float) -> bool:
        """The feeder is idle with nothing buffered, and the slot's inbox has room for every frame a message
        of ``seconds`` can complete (so that pushing it does not wait)."""
        if self.feeding or not self.received.empty():
            return False
        samples = self.frames.pending + int(np.ceil(seconds * self.service.sample_rate))
        return self.service.scheduler.inbox_space(self.session.handle) > samples // self.service.frame_size

    async def _feed(self, ogg: bytes, arrived: float) -> None:
        """Decode one message and push the frames it completes (waiting while the slot's inbox is full)."""
        for frame in self.frames.add(self.decode(ogg)):
            await self.service.scheduler.push(self.session.handle, frame, arrived)

    async def _throttled(self) -> None:
        """Stop reading until the feeder made room; end the session if that takes too long."""
        self.space.clear()
        try:
            await asyncio.wait_for(self.space.wait(), self.max_throttled_seconds)
        except asyncio.TimeoutError:
            self.session.finish("too_far_ahead", f"client too far ahead of real time: {self.received_seconds:.0f} s "
                                f"of its audio waited over {self.max_throttled_seconds:g} s to be read; send audio "
                                "in real time")

    async def feed_loop(self) -> None:
        """The feeder: receive buffer -> decode -> 80 ms frames -> scheduler inbox (waits while it is full)."""
        session = self.session
        try:
            for count in itertools.count(1):
                if count % YIELD_EVERY_MESSAGES == 0:
                    await asyncio.sleep(0)
                ogg, arrived, seconds = await self.received.get()
                self.received_bytes -= len(ogg)
                self.received_seconds -= seconds
                if self.received_bytes <= self.buffer_bytes:
                    self.space.set()
                self.feeding = True
                await self._feed(ogg, arrived)
                self.feeding = False
        except ProtocolError as exc:
            session.finish("bad_input", str(exc))
        except Exception as exc:  # noqa: BLE001 - ends only this session
            logger.exception("session %s: feeding the scheduler failed", session.id)
            session.finish("server_error", f"server error: {type(exc).__name__}")
