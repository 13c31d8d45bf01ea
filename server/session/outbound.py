"""A session's way out: Opus encode, the bounded outbox, the sender, and the slow-client rule.

A message is sent at once, from the callback that produced it, when nothing waits before it (the outbox
is empty and the sender idle; see :mod:`duplex.server.session.eager`); otherwise it joins the outbox and
the sender sends it in order. Sending at once saves the sender's event-loop iteration on every audio page.

A model frame counts as sent (``duplex_frames_out``) once the send of the Ogg page carrying it
completed; frames still unsent when the session ends count as dropped (out). Latency: the arrival
stamp of the user frame a step consumed is observed when the page carrying its output was sent (a
frame the Opus writer held back is timed with the next page).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Callable

import numpy as np
import sphn

from duplex.server import protocol
from duplex.server.protocol import MessageKind
from duplex.server.session.eager import start_eagerly
from duplex.server.session.transport import find_transport, unsent_bytes

logger = logging.getLogger(__name__)

# A model frame queues up to 3 messages (audio page, text piece, token ids), so a client is "too slow"
# once it leaves ``outbox_frames`` audio pages or 3x that many messages of any kind unsent.
MESSAGES_PER_FRAME = 3


class Outbound:
    """Everything a session sends after the handshake goes through here."""

    def __init__(self, session) -> None:
        self.session = session
        service = session.service
        self.service = service
        # (message, arrival times of the user frames whose output it carries, model frames it carries);
        # None = stop sending
        self.outbox: asyncio.Queue[tuple[bytes, list[float], int] | None] = asyncio.Queue()
        self.audio_queued = 0  # audio messages in the outbox
        self.frames_unsent = 0  # model frames in audio messages queued or being sent (not sent yet)
        self.queued = 0  # messages of any kind in the outbox (bounded: see deliver)
        self.unsent_arrivals: list[float] = []  # frames handed to the Opus writer, no page out yet
        self.unpaged_frames = 0  # model frames handed to the Opus writer, no page out yet
        self.opus_out = sphn.OpusStreamWriter(service.sample_rate)
        self.transport = find_transport(session.ws)
        self.bytes_written = 0  # websocket bytes handed to the transport (payload + frame header)
        self.pages_in_flight: deque[int] = deque()  # end offset of each audio page sent, maybe unread
        self.last_audio_sent: float | None = None  # perf_counter() when the last audio page was sent
        self.on_gone: Callable[[], None] | None = None  # set by send_loop: sends may start at once from then
        self.sender_busy = False  # the sender is sending an outbox item
        self.sending: asyncio.Future | None = None  # the rest of a send started at once that had to wait
        self.gone = False  # a send failed: the client is gone, nothing more is sent

    def record_written(self, data: bytes) -> None:
        """Count one message handed to the transport (the websocket header of a server frame: 2-10 bytes)."""
        self.bytes_written += len(data) + (2 if len(data) < 126 else 4 if len(data) < 65536 else 10)
        if data[:1] == bytes([MessageKind.AUDIO]):
            self.pages_in_flight.append(self.bytes_written)

    def unread_pages(self) -> int:
        """Audio pages sent but still on the server's side of the connection (the client is not reading)."""
        received = self.bytes_written - unsent_bytes(self.transport)
        while self.pages_in_flight and self.pages_in_flight[0] <= received:
            self.pages_in_flight.popleft()
        return len(self.pages_in_flight)

    def too_slow(self) -> str | None:
        """The kind-5 text when the client left too much output unread (queued here, or sent but still
        in the server's socket buffers), else None."""
        limit = self.service.settings.outbox_frames
        pages = self.audio_queued + (self.unread_pages() if self.transport is not None else 0)
        if pages >= limit or self.queued >= limit * MESSAGES_PER_FRAME:
            frames = max(pages, self.queued // MESSAGES_PER_FRAME)
            seconds = frames * self.service.frame_size / self.service.sample_rate
            return f"client too slow: {seconds:.1f} s of model output not read"
        return None

    def deliver(self, pcm: np.ndarray, text_id: int, tokens: np.ndarray, arrived: float | None,
                finish: Callable[[str, str], None]) -> None:
        """Queue one output frame (Opus audio, text piece, optionally token ids) for sending."""
        slow = self.too_slow()
        if slow is not None:
            finish("slow_client", slow)
            return
        if arrived is not None:
            self.unsent_arrivals.append(arrived)
        self.unpaged_frames += 1
        ogg = self.opus_out.append_pcm(pcm)
        if ogg:
            frames, self.unpaged_frames = self.unpaged_frames, 0
            arrivals, self.unsent_arrivals = self.unsent_arrivals, []
            self.enqueue(protocol.encode_audio(ogg), arrivals, frames)
        piece = self.service.text_piece(text_id)
        if piece:
            self.enqueue(protocol.encode_text(piece))
        if self.service.settings.send_tokens:
            self.enqueue(protocol.encode_metadata({"type": "tokens", "tokens": tokens.tolist()}))

    def enqueue(self, data: bytes, arrivals: list[float] | None = None, frames: int = 0) -> None:
        """Send one message now if nothing waits before it, else queue it for the sender (counted against
        the slow-client limit); ``frames``: the model frames an audio message carries (counted as sent
        once it is)."""
        self.frames_unsent += frames
        if self.gone:
            return  # its frames count as dropped when the session ends
        if self.on_gone is not None and not self.sender_busy and self.sending is None and self.outbox.empty():
            self.sending = start_eagerly(self._send(data, arrivals or [], frames))
            if self.sending is not None:  # it has to wait (the transport is not writable): later ones queue
                self.sending.add_done_callback(self._eager_send_done)
            return
        self.outbox.put_nowait((data, arrivals or [], frames))
        self.queued += 1
        if data[0] == MessageKind.AUDIO:
            self.audio_queued += 1

    def _eager_send_done(self, task: asyncio.Future) -> None:
        if self.sending is task:
            self.sending = None
        if not task.cancelled() and task.exception() is not None:  # _send catches Exception: this is a bug
            logger.error("session %s: send failed", self.session.id, exc_info=task.exception())

    async def send_loop(self, on_gone: Callable[[], None]) -> None:
        """The sender: outbox -> socket, until a None item or the client is gone."""
        self.on_gone = on_gone
        try:
            while True:
                item = await self.outbox.get()
                self.sender_busy = True
                if self.sending is not None:  # a send started at once is still going: keep the order
                    await asyncio.wait([self.sending])
                if item is None:
                    return
                data, arrivals, frames = item
                self.queued -= 1
                if data[0] == MessageKind.AUDIO:
                    self.audio_queued -= 1
                if not await self._send(data, arrivals, frames):
                    return
                self.sender_busy = False
        finally:
            self.on_gone = None  # the sender is gone: nothing starts at once any more either
            if self.sending is not None:
                self.sending.cancel()

    async def _send(self, data: bytes, arrivals: list[float], frames: int) -> bool:
        """Send one message and count it; False (and the session told) when the client is gone."""
        try:
            await self.session.send_now(data)
        except Exception:  # noqa: BLE001 - the client went away (its frames count as dropped)
            logger.debug("session %s: send failed", self.session.id, exc_info=True)
            self.gone = True
            if self.on_gone is not None:
                self.on_gone()
            return False
        if data[0] == MessageKind.AUDIO:
            self._note_audio_sent()
        if frames:
            self.frames_unsent -= frames
            self.session.record.frames_out += frames
            self.service.metrics.frames_out.inc(frames)
        if arrivals:
            sent = time.perf_counter()
            for arrived in arrivals:
                self.service.metrics.observe_frame_latency(sent - arrived)
        return True

    def _note_audio_sent(self) -> None:
        now = time.perf_counter()
        if self.last_audio_sent is not None:
            record = self.session.record
            record.max_audio_gap_ms = max(record.max_audio_gap_ms, 1000 * (now - self.last_audio_sent))
        self.last_audio_sent = now

    async def flush(self, sender: asyncio.Future, flush: bool) -> None:
        """Let the sender flush the outbox (bounded by drain_seconds) unless ``flush`` is False, then stop it
        and count the model frames never sent as dropped (out)."""
        if flush:
            self.outbox.put_nowait(None)
            try:
                await asyncio.wait_for(sender, timeout=self.service.settings.drain_seconds)
            except Exception:  # noqa: BLE001 - timeout or a socket gone while flushing
                logger.debug("session %s: output not fully flushed", self.session.id, exc_info=True)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        if self.frames_unsent > 0:
            self.session.record.frames_dropped_out += self.frames_unsent
            self.service.metrics.frames_dropped.labels("out").inc(self.frames_unsent)
