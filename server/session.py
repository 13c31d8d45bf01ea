"""One websocket connection: query parameters, queueing, Opus in/out, bounded queues, ending.

Inbound, two tasks: the *reader* reads the socket continuously, parses each message
(:mod:`duplex.server.protocol`), decodes kind-1 Ogg/Opus with ``sphn.OpusStreamReader`` and cuts
it into 80 ms frames put in a bounded *receive buffer* (:data:`RECEIVE_BUFFER_FRAMES`); the
*feeder* pushes them to the scheduler, which applies backpressure. The reader stops reading the
socket only while the receive buffer is full (TCP backpressure for clients faster than real time),
so a hang-up is seen as soon as it reaches the server even while the model runs behind real time
and the scheduler holds a backlog: the session ends at once and its slot goes to the queue.
Outbound: the scheduler's output is Opus-encoded on the event loop and queued in a bounded
*outbox* drained by a sender task. A client that does not read its audio for ``outbox_frames``
frames is disconnected with a kind-5 "too slow" error, so it can never stall the model loop or
the other sessions. A model frame counts as sent (``duplex_frames_out``) once the send of the Ogg
page carrying it completed; frames still unsent when the session ends count as dropped (out).

Latency: each user frame is stamped with ``time.perf_counter()`` when it is complete at the server
(decoded, before the receive buffer); the stamp travels with the frame through the scheduler to the
output of the step that consumed it, and ``duplex_frame_latency_seconds`` observes the time until
the websocket send of the Ogg page carrying that output completed. The Opus writer may hold output
back (no page for a frame); such a frame is timed when the next page, which carries it, is sent.

Bad input ends only the offending session, with a kind-5 error: text frames, empty or oversized
messages, audio that is not Ogg/Opus. Control (3), ping (6), client-sent handshake/text/metadata
and unknown kinds are ignored.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING

import numpy as np
import sphn
from starlette.websockets import WebSocket, WebSocketState

from duplex.server import protocol
from duplex.server.admission import Busy, Closed
from duplex.server.frames import FrameAssembler
from duplex.server.metrics import SessionRecord
from duplex.server.protocol import MessageKind, ProtocolError
from duplex.server.scheduler import SchedulerFailed, SchedulerFull

if TYPE_CHECKING:
    from duplex.server.app import DuplexService

logger = logging.getLogger(__name__)

# Decoded user frames a session buffers between its socket and the scheduler (20 s, 7.7 kB each).
# Beyond it the session stops reading its socket: a hang-up is seen late only once a client is
# more than this (plus the scheduler inbox) ahead of the model.
RECEIVE_BUFFER_FRAMES = 250
CLOSE_TIMEOUT_SECONDS = 1.0  # how long sending the close frame may take
# Outbox bound: a model frame queues up to 3 messages (audio page, text piece, token ids), so a client
# is "too slow" once it leaves ``outbox_frames`` audio pages or 3x that many messages of any kind unsent.
MESSAGES_PER_FRAME = 3


class Session:
    """Serves one websocket from accept to close."""

    def __init__(self, websocket: WebSocket, service: DuplexService) -> None:
        self.ws = websocket
        self.service = service
        self.id = uuid.uuid4().hex[:12]
        client = websocket.client
        self.record = SessionRecord(session_id=self.id, client=f"{client.host}:{client.port}" if client else "?")
        # (message, arrival times of the user frames whose output it carries, model frames it carries);
        # None = stop sending
        self.outbox: asyncio.Queue[tuple[bytes, list[float], int] | None] = asyncio.Queue()
        self._audio_queued = 0  # audio messages in the outbox
        self._frames_unsent = 0  # model frames in audio messages queued or being sent (not sent yet)
        self._queued = 0  # messages of any kind in the outbox (bounded: see deliver)
        self._holds_admission = False
        self._received: asyncio.Queue[tuple[np.ndarray, float]] = asyncio.Queue(RECEIVE_BUFFER_FRAMES)
        self._unsent_arrivals: list[float] = []  # frames handed to the Opus writer, no page out yet
        self._unpaged_frames = 0  # model frames handed to the Opus writer, no page out yet
        self._done = asyncio.Event()
        self._end_reason: str | None = None
        self._end_error: str | None = None
        self._opus_in = sphn.OpusStreamReader(service.sample_rate)
        self._opus_out = sphn.OpusStreamWriter(service.sample_rate)
        self._frames = FrameAssembler(service.frame_size)
        self.handle = None
        self._resolved: dict = {}  # the session's resolved sampling settings (metadata)

    # ------------------------------------------------------------------ entry point
    async def run(self) -> None:
        """Accept, validate, wait for a slot, stream until the end, clean up."""
        await self.ws.accept()
        started = time.monotonic()
        try:
            params = protocol.parse_query_params(self.ws.query_params, adapters=self.service.adapter_names)
        except ValueError as exc:
            await self._reject(str(exc), "bad_params")
            return
        if not await self._wait_for_slot():
            return
        self._holds_admission = True
        self.record.queued_s = time.monotonic() - started
        refusal = self._join_scheduler(params)
        if refusal is not None:
            self._release_admission()
            await self._reject(*refusal)
            return
        try:
            await self._converse(params)
        finally:
            self._release_admission()
            self.record.duration_s = time.monotonic() - started - self.record.queued_s
            self.record.end_reason = self._end_reason or "unknown"
            self.service.metrics.sessions_ended.labels(self.record.end_reason).inc()
            self.record.log()

    def _release_admission(self) -> None:
        """Give the admitted slot back (once), so that the next queued client starts."""
        if self._holds_admission:
            self._holds_admission = False
            self.service.admission.release()

    def _join_scheduler(self, params: protocol.SessionParams) -> tuple[str, str] | None:
        """Bind to a batch slot, or say why not: (message sent as kind 5, rejection reason).

        No await between the check and the join: a session admitted just as shutdown starts is told.
        """
        refusal = self.service.refusal()
        if refusal is not None:
            return refusal, "shutdown" if self.service.shutting_down else "server_error"
        sampling, self._resolved = self.service.sampling_for(params)
        try:
            self.handle = self.service.scheduler.join(self, sampling)
        except SchedulerFailed as exc:
            return str(exc), "shutdown" if self.service.shutting_down else "server_error"
        except SchedulerFull as exc:  # admission and scheduler disagree: should not happen, but must not leak
            logger.warning("session %s: admitted but no batch slot free (%s)", self.id, exc)
            return f"server busy: {exc}; try again later", "busy"
        return None

    async def _reject(self, message: str | None, reason: str) -> None:
        """Refuse the session (counted by reason): a kind-5 error, then close; no message = the client is gone."""
        self.service.metrics.rejected.labels(reason).inc()
        self.record.end_reason = reason
        if message is not None:
            try:
                await self._send_now(protocol.encode_error(message))
            except Exception:  # noqa: BLE001 - the client is gone already
                logger.debug("session %s: could not send %r", self.id, message, exc_info=True)
            await self._close()
        self.record.log()

    # ------------------------------------------------------------------ admission
    async def _wait_for_slot(self) -> bool:
        """Queue for a slot while watching for the client leaving. False = session will not start."""
        if self.service.admission.try_acquire():
            return True
        acquire = asyncio.ensure_future(self.service.admission.acquire(self._send_position))
        watch = asyncio.ensure_future(self._read_while_queued())
        try:
            done, _ = await asyncio.wait({acquire, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if watch in done:  # the client left (or sent bad input) while queued, even if a slot came too
            await self._give_up_queued_slot(acquire)
            error = None if watch.cancelled() or watch.exception() else watch.result()
            await self._reject(error, "bad_input" if error else "left_queue")
            return False
        try:
            acquire.result()
        except Busy as exc:
            await self._reject(str(exc), "busy")
            return False
        except Closed as exc:
            await self._reject(str(exc), "shutdown" if self.service.shutting_down else "server_error")
            return False
        except Exception:  # noqa: BLE001 - a position update found the client gone
            logger.debug("session %s: left while queued", self.id, exc_info=True)
            await self._reject(None, "left_queue")
            return False
        return True

    async def _give_up_queued_slot(self, acquire: asyncio.Future) -> None:
        """Stop waiting for a slot; one granted already (in the same turn the client left) goes back."""
        if not acquire.done():
            acquire.cancel()  # a slot granted but not yet taken is given back by the admission itself
        await asyncio.gather(acquire, return_exceptions=True)
        if not acquire.cancelled() and acquire.exception() is None:
            self.service.admission.release()

    async def _send_position(self, position: int) -> None:
        await self._send_now(protocol.encode_metadata({"type": "queue", "queue_position": position}))

    async def _read_while_queued(self) -> str | None:
        """Until the client disconnects (None) or breaks the protocol (the error): read its messages.

        Audio sent before the handshake is decoded (keeping the Ogg stream consistent) and dropped.
        """
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return None
            try:
                parsed = self._parse(message)
                if parsed.kind is MessageKind.AUDIO:
                    dropped = self._decode(parsed.payload).size / self.service.frame_size
                    self.service.metrics.frames_dropped.labels("in").inc(dropped)
            except ProtocolError as exc:
                return str(exc)

    # ------------------------------------------------------------------ the conversation
    async def _converse(self, params: protocol.SessionParams) -> None:
        """Stream with the bound slot until the session ends; the slot is freed (and admission released)
        before the output is flushed."""
        self.record.slot = self.handle.slot
        self.service.sessions.add(self)
        sender = asyncio.ensure_future(self._send_loop())
        receiver = asyncio.ensure_future(self._receive_loop())
        feeder = asyncio.ensure_future(self._feed_loop())
        try:
            self._enqueue(protocol.encode_handshake())
            self._enqueue(protocol.encode_metadata(self.service.session_metadata(self.id, params, self._resolved)))
            limit = self.service.settings.max_session_seconds or None
            try:
                await asyncio.wait_for(self._done.wait(), timeout=limit)
            except asyncio.TimeoutError:
                self.finish("time_limit", f"session time limit of {limit:g} s reached")
        finally:
            self.service.scheduler.leave(self.handle)
            self._release_admission()  # the slot is free now: a queued client need not wait for the flush
            self.service.sessions.discard(self)
            receiver.cancel()
            feeder.cancel()
            await asyncio.gather(receiver, feeder, return_exceptions=True)
            await self._drain_and_close(sender)
            self.record.frames_in = self.handle.frames_in
            self.record.frames_late = self.handle.frames_late
            self.record.frames_dropped_in = self.handle.frames_dropped

    def finish(self, reason: str, error: str | None = None) -> None:
        """End the session (first call wins); ``error`` is sent as kind 5 after the pending output."""
        if self._end_reason is None:
            self._end_reason = reason
            self._end_error = error
        self._done.set()

    async def _drain_and_close(self, sender: asyncio.Future) -> None:
        """Flush the outbox (bounded time), send the kind-5 error if any, close the socket.

        A client that closed or is too slow to read gets no flush: its pending output is dropped.
        """
        flush = self._end_reason not in ("client_closed", "slow_client")
        if flush:
            self.outbox.put_nowait(None)
            try:
                await asyncio.wait_for(sender, timeout=self.service.settings.drain_seconds)
            except Exception:  # noqa: BLE001 - timeout or a socket gone while flushing
                logger.debug("session %s: output not fully flushed", self.id, exc_info=True)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        if self._frames_unsent > 0:
            self.record.frames_dropped_out += self._frames_unsent
            self.service.metrics.frames_dropped.labels("out").inc(self._frames_unsent)
        if self._end_error is not None and self._end_reason != "client_closed":
            try:
                await asyncio.wait_for(self._send_now(protocol.encode_error(self._end_error)), timeout=1.0)
            except Exception:  # noqa: BLE001 - the client may be gone already
                logger.debug("session %s: could not send the error", self.id, exc_info=True)
        await self._close()

    async def _receive_loop(self) -> None:
        """The reader: socket -> receive buffer, until the client leaves or breaks the protocol."""
        try:
            while not self._done.is_set():
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    self.finish("client_closed")
                    return
                await self._on_message(message)
        except ProtocolError as exc:
            self.finish("bad_input", str(exc))
        except Exception:  # noqa: BLE001 - a broken socket ends only this session
            logger.debug("session %s: receive failed", self.id, exc_info=True)
            self.finish("client_closed")

    async def _on_message(self, message: dict) -> None:
        parsed = self._parse(message)
        if parsed.kind is MessageKind.AUDIO:
            arrived = time.perf_counter()
            for frame in self._frames.add(self._decode(parsed.payload)):
                await self._received.put((frame, arrived))  # waits (stops reading) while the buffer is full
        # control, ping, client-sent handshake/text/metadata/error and unknown kinds: ignored

    async def _feed_loop(self) -> None:
        """The feeder: receive buffer -> scheduler inbox, waiting while the inbox is full."""
        try:
            while True:
                frame, arrived = await self._received.get()
                await self.service.scheduler.push(self.handle, frame, arrived)
        except Exception as exc:  # noqa: BLE001 - ends only this session
            logger.exception("session %s: feeding the scheduler failed", self.id)
            self.finish("server_error", f"server error: {type(exc).__name__}")

    def _parse(self, message: dict) -> protocol.Message:
        data = message.get("bytes")
        if data is None:
            raise ProtocolError("text frames are not supported: send binary messages (kind byte + payload)")
        self.record.bytes_in += len(data)
        self.service.metrics.bytes.labels("in").inc(len(data))
        return protocol.parse_message(data, self.service.settings.max_message_bytes)

    def _decode(self, ogg: bytes) -> np.ndarray:
        """Ogg/Opus bytes -> [N] float32 PCM (N may be 0)."""
        try:
            pcm = self._opus_in.append_bytes(ogg)
        except Exception as exc:  # noqa: BLE001 - sphn raises ValueError/OSError for bad streams
            raise ProtocolError(f"audio is not a valid Ogg/Opus stream: {exc}") from None
        return np.asarray(pcm, dtype=np.float32)

    async def _send_loop(self) -> None:
        while True:
            item = await self.outbox.get()
            if item is None:
                return
            data, arrivals, frames = item
            self._queued -= 1
            if data[0] == MessageKind.AUDIO:
                self._audio_queued -= 1
            try:
                await self._send_now(data)
            except Exception:  # noqa: BLE001 - the client went away (its frames count as dropped)
                logger.debug("session %s: send failed", self.id, exc_info=True)
                self.finish("client_closed")
                return
            if frames:
                self._frames_unsent -= frames
                self.record.frames_out += frames
                self.service.metrics.frames_out.inc(frames)
            if arrivals:
                sent = time.perf_counter()
                for arrived in arrivals:
                    self.service.metrics.observe_frame_latency(sent - arrived)

    async def _send_now(self, data: bytes) -> None:
        await self.ws.send_bytes(data)
        self.record.bytes_out += len(data)
        self.service.metrics.bytes.labels("out").inc(len(data))

    async def _close(self) -> None:
        """Close the socket; bounded in time (a peer that reads nothing can block the close frame
        behind unsent output, and the admission slot is only released after this)."""
        if self.ws.application_state != WebSocketState.DISCONNECTED:
            try:
                await asyncio.wait_for(self.ws.close(), timeout=CLOSE_TIMEOUT_SECONDS)
            except Exception:  # noqa: BLE001 - already closed by the peer, or it does not read
                logger.debug("session %s: close not completed", self.id, exc_info=True)

    # ------------------------------------------------------------------ scheduler callbacks (loop thread)
    def deliver(self, pcm: np.ndarray, text_id: int, tokens: np.ndarray, arrived: float | None = None) -> None:
        """Queue one output frame (Opus audio, text piece, optionally token ids) for sending.

        ``arrived``: when the user frame its step consumed reached the server (None: silence).
        """
        if self._done.is_set():
            return
        limit = self.service.settings.outbox_frames
        if self._audio_queued >= limit or self._queued >= limit * MESSAGES_PER_FRAME:
            frames = max(self._audio_queued, self._queued // MESSAGES_PER_FRAME)
            seconds = frames * self.service.frame_size / self.service.sample_rate
            self.finish("slow_client", f"client too slow: {seconds:.1f} s of model output not read")
            return
        if arrived is not None:
            self._unsent_arrivals.append(arrived)
        self._unpaged_frames += 1
        ogg = self._opus_out.append_pcm(pcm)
        if ogg:
            self._enqueue(protocol.encode_audio(ogg), self._unsent_arrivals, self._unpaged_frames)
            self._unsent_arrivals = []
            self._audio_queued += 1
            self._frames_unsent += self._unpaged_frames
            self._unpaged_frames = 0
        piece = self.service.text_piece(text_id)
        if piece:
            self._enqueue(protocol.encode_text(piece))
        if self.service.settings.send_tokens:
            self._enqueue(protocol.encode_metadata({"type": "tokens", "tokens": tokens.tolist()}))

    def _enqueue(self, data: bytes, arrivals: list[float] | None = None, frames: int = 0) -> None:
        """Queue one message for the sender (counted against the slow-client limit); ``frames``: the
        model frames an audio message carries (counted as sent once it is)."""
        self.outbox.put_nowait((data, arrivals or [], frames))
        self._queued += 1

    def fail(self, reason: str) -> None:
        """The scheduler died: end with an error."""
        self.finish("server_error", reason)
