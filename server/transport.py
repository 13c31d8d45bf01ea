"""The HTTP and websocket transport of `duplex serve`: uvicorn's protocols with every pre-session stage bounded.

uvicorn parses HTTP (h11 here) and hands a websocket upgrade to a websockets-sansio protocol. Left as
they are, a connection that sends nothing, or half a request head, is held forever; a websocket upgrade
whose request line is too long gets no response; pongs to a ping flood queue without bound when the
client does not read; a text frame with invalid UTF-8 logs a traceback; a message over the transport's
size limit is closed with 1009 but no kind-5 error. The subclasses below close those gaps:

* :class:`DuplexHttpProtocol`: a request head must be complete within ``handshake_seconds`` of the
  connection (or of the previous response), else ``408`` and close; the head is at most
  :data:`MAX_REQUEST_HEAD_BYTES` (h11 answers ``400`` beyond). A new connection's first bytes wait at
  the handshake gate (:mod:`duplex.server.handshake_gate`, reading paused meanwhile), so that a burst
  of connections is handled a few milliseconds per event-loop iteration; one still there at its
  deadline is judged on what it sent.
* :class:`DuplexWebSocketProtocol`: answers a request line / header that websockets refuses (414/431);
  refuses oversized messages with a kind-5 error before the 1009 close; hands invalid UTF-8 text to the
  app as text (which the session refuses with its kind-5 error) instead of logging a traceback; limits
  pings per connection (a token bucket) and never queues a pong while the client does not read; closes a
  fragmented message left unfinished for ``fragment_seconds``; does not let the keepalive kill a client
  that keeps sending while its pong waits behind audio the server has not read yet (backpressure, not a
  dead peer; a peer that sends nothing for a ping period and its timeout is still closed 1011).

:func:`harden_config` installs them, with the matching uvicorn options, on a ``uvicorn.Config``.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode

from duplex.server import protocol
from duplex.server.handshake_gate import gate_for
from duplex.server.log_filters import FloodLogFilter, RedactQueryFilter, redact_query  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

MAX_REQUEST_HEAD_BYTES = 16 * 1024  # request line + headers; browsers send a few KiB at most
KEEPALIVE_PING_SECONDS = 20.0  # the server's websocket keepalive ping interval
KEEPALIVE_TIMEOUT_SECONDS = 20.0  # a pong must come within this (unless the server is not reading: see above)
CLOSE_POLICY = 1008  # websocket close code "policy violation"
HEAD_DEADLINE_SPREAD = 0.1  # request-head deadlines fall in [0.9, 1] x handshake_seconds
LATE_READ_GRACE_SECONDS = 0.1  # a connection judged at the gate: time to read what its socket still holds
READ_SLICE_BYTES = 16 * 1024  # bytes of websocket frames parsed per event-loop callback (about 80 messages)


@dataclass(frozen=True)
class TransportLimits:
    """Bounds applied before (and beside) a session; see the module docstring."""

    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES
    handshake_seconds: float = 10.0  # connection -> complete request head (and websocket upgrade)
    fragment_seconds: float = 10.0  # first fragment -> last fragment of one message
    pings_per_second: float = 5.0  # sustained client pings allowed per connection
    ping_burst: int = 20  # pings allowed at once


class TransportCounters:
    """What the transport refused, by reason; wired to a Prometheus counter by :func:`harden_config`."""

    def __init__(self, counter=None) -> None:
        self.counter = counter

    def inc(self, reason: str) -> None:
        if self.counter is not None:
            self.counter.labels(reason).inc()


class DuplexHttpProtocol(H11Protocol):
    """h11 with a deadline on every request head (class attributes set by :func:`harden_config`)."""

    limits = TransportLimits()
    counters = TransportCounters()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = None
        self._arm_head_timer()
        self._gate = gate_for(self.loop)
        self._first_bytes: bytearray | None = None  # this connection's first bytes, while at the gate
        self._passed_gate = False

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            # 90-100 % of the deadline, at random: connections opened in one burst (a flood) do not all
            # time out in the same event-loop iteration, which would stall every conversation at once.
            deadline = self.limits.handshake_seconds * (1.0 - HEAD_DEADLINE_SPREAD * random.random())
            self._head_timer = self.loop.call_later(deadline, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if not self._passed_gate:  # a new connection's first request waits its turn (server/handshake_gate.py)
            if self._first_bytes is None:
                self._first_bytes = bytearray()
                self.transport.pause_reading()  # the rest stays in the kernel until the gate lets it in
                self._gate.enter(self)
            self._first_bytes += data
            return
        self._handle_data(data)

    def release_gate(self) -> None:
        """The gate's turn for this connection: handle what it sent so far, and read on."""
        data, self._first_bytes, self._passed_gate = self._first_bytes, None, True
        if data is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        try:
            self._handle_data(bytes(data))
        except Exception:  # noqa: BLE001 - as the transport would for data_received: this connection only
            logger.exception("handling a new connection from %s failed", self.client)
            self.transport.abort()

    def _handle_data(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            self._disarm_head_timer()
        elif self.conn.their_state is h11.IDLE:  # part of a head (or nothing yet): the deadline keeps running
            self._arm_head_timer()
        else:
            self._disarm_head_timer()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._disarm_head_timer()
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn's keep-alive timer closes an idle connection; a head started later must complete in time
        # (also one already buffered behind the request just answered).
        self._disarm_head_timer()
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        if self._first_bytes is not None:  # closed at the gate: nobody is left to answer
            self._gate.leave(self)
            self._first_bytes = None
        super().connection_lost(exc)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._first_bytes is not None:  # still at the gate: judge what the client sent, now
            self._gate.leave(self)
            self.release_gate()
            self._disarm_head_timer()  # the deadline has passed: a partial head gets no new one...
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                # ...but what waits unread in the kernel (reading was paused at the gate) still counts
                self._head_timer = self.loop.call_later(LATE_READ_GRACE_SECONDS, self._head_timeout)
                return
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is being sent: the head of the next request is not due yet
        self.counters.inc("handshake_timeout")
        body = f"request not completed within {self.limits.handshake_seconds:g} s\n".encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()


class DuplexWebSocketProtocol(WebSocketsSansIOProtocol):
    """websockets-sansio with the bounds of :class:`TransportLimits` (class attributes set by harden_config)."""

    limits = TransportLimits()
    counters = TransportCounters()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ping_tokens = float(self.limits.ping_burst)
        self._ping_refill = time.monotonic()
        self._ping_flood = False
        # websockets queues a pong for every ping while parsing a chunk (before uvicorn sees the events):
        # rate-limit at that point, frame by frame.
        self._send_frame = self.conn.send_frame
        self.conn.send_frame = self._send_frame_limited
        self._fragment_timer = None
        self._accept_timer = None
        self._last_data_at = 0.0  # loop time of the last bytes received (keepalive: see keepalive_timeout)
        self._unparsed = bytearray()  # received bytes waiting for their slice (see data_received)

    # ------------------------------------------------------------------ handshake
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # The app must accept (or refuse) the upgrade in time: it does at once unless something is stuck.
        self._accept_timer = self.loop.call_later(self.limits.handshake_seconds, self._accept_timeout)

    def _accept_timeout(self) -> None:
        self._accept_timer = None
        if not self.handshake_complete and not self.transport.is_closing():
            self.counters.inc("handshake_timeout")
            self.send_500_response()
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        """Parse at most READ_SLICE_BYTES per loop callback: a client that sent a burst (a file, as fast as
        it goes) must not hold the event loop for the whole chunk the loop read (up to 256 KiB, a thousand
        messages), which would stall every other conversation's audio. The rest follows in later callbacks,
        in order; meanwhile uvicorn's own backpressure (pause_reading) keeps further data in the kernel."""
        self._last_data_at = self.loop.time()
        if self._unparsed:
            self._unparsed += data
            return
        if len(data) > READ_SLICE_BYTES:
            self._unparsed = bytearray(data[READ_SLICE_BYTES:])
            data = data[:READ_SLICE_BYTES]
            self.loop.call_soon(self._parse_next_slice)
        self._parse(data)

    def _parse_next_slice(self) -> None:
        # Even when the transport is closing (the client's FIN closes it at once): what the client sent before
        # reaches the app, in order (connection_lost parses whatever is left).
        if not self._unparsed:
            return
        data = bytes(self._unparsed[:READ_SLICE_BYTES])
        del self._unparsed[:READ_SLICE_BYTES]
        if self._unparsed:
            self.loop.call_soon(self._parse_next_slice)
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None and not self.transport.is_closing():
            # websockets refused the request head (line too long, too many headers) and queued its 414/431
            # response; uvicorn writes nothing in that case.
            self.counters.inc("bad_request_head")
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if self._unparsed:  # what the client sent before it closed still reaches the app, in order
            data = bytes(self._unparsed)
            self._unparsed.clear()
            super().data_received(data)
        for timer in (self._fragment_timer, self._accept_timer):
            if timer is not None:
                timer.cancel()
        self._fragment_timer = self._accept_timer = None
        super().connection_lost(exc)

    async def send(self, message) -> None:
        if message["type"] in ("websocket.accept", "websocket.close", "websocket.http.response.start"):
            if self._accept_timer is not None:
                self._accept_timer.cancel()
                self._accept_timer = None
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # A refusal by HTTP response (401/403/429/503) ends the handshake as a close does: without this
            # uvicorn logs "ASGI callable returned without completing handshake." at ERROR for every one.
            self.handshake_complete = True

    # ------------------------------------------------------------------ messages
    def handle_text(self, event: Frame) -> None:
        self._track_fragments(event)
        super().handle_text(event)

    def handle_bytes(self, event: Frame) -> None:
        self._track_fragments(event)
        super().handle_bytes(event)

    def handle_cont(self, event: Frame) -> None:
        if event.fin:
            self._stop_fragment_timer()
        super().handle_cont(event)

    def _track_fragments(self, event: Frame) -> None:
        self._stop_fragment_timer()
        if not event.fin:
            self._fragment_timer = self.loop.call_later(self.limits.fragment_seconds, self._fragment_timeout)

    def _stop_fragment_timer(self) -> None:
        if self._fragment_timer is not None:
            self._fragment_timer.cancel()
            self._fragment_timer = None

    def _fragment_timeout(self) -> None:
        self._fragment_timer = None
        self._refuse("fragment_timeout", f"message not completed within {self.limits.fragment_seconds:g} s")

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                # Not a traceback per connection in the log: the app refuses every text frame with a kind-5
                # error anyway, so it gets this one too, with the bad bytes replaced.
                logger.debug("invalid UTF-8 in a text frame from %s", self.client)
                self.frames = [data.decode("utf-8", errors="replace").encode("utf-8")]
        super().send_receive_event_to_app()

    def handle_parser_exception(self) -> None:
        exc = self.conn.parser_exc
        if isinstance(exc, PayloadTooBig) and self.handshake_complete and not self.close_sent:
            self.counters.inc("message_too_big")
            self._write_error(f"message exceeds the limit of {self.limits.max_message_bytes} bytes")
        super().handle_parser_exception()

    # ------------------------------------------------------------------ pings and keepalive
    def _send_frame_limited(self, frame: Frame) -> None:
        """websockets' frame output, with each pong to a client ping taken from a token bucket."""
        if frame.opcode is Opcode.PONG:
            now = time.monotonic()
            rate, burst = self.limits.pings_per_second, self.limits.ping_burst
            self._ping_tokens = min(float(burst), self._ping_tokens + (now - self._ping_refill) * rate)
            self._ping_refill = now
            if self._ping_tokens < 1.0:
                self._ping_flood = True
                return
            self._ping_tokens -= 1.0
            if not self.writable.is_set():  # the client does not read: no pong piles up behind its unread data
                self.counters.inc("pong_dropped")
                return
        self._send_frame(frame)

    def handle_ping(self) -> None:
        if self._ping_flood:
            rate, burst = self.limits.pings_per_second, self.limits.ping_burst
            self._refuse("ping_flood", f"too many pings: at most {rate:g} per second (burst {burst})")
            return
        super().handle_ping()

    def keepalive_timeout(self) -> None:
        if self._last_data_at > self.ping_sent_at and not self.transport.is_closing() and not self.close_sent:
            # Bytes arrived since the ping: the peer is alive, its pong is only queued behind data the server
            # has not read yet (backpressure on a client faster than real time). Wait another period instead
            # of killing it; the session's own rules (too slow, time limit) still apply.
            self.pong_timer = self.loop.call_later(self.ping_timeout, self.keepalive_timeout)
            return
        super().keepalive_timeout()

    # ------------------------------------------------------------------ refusing
    def _write_error(self, message: str) -> None:
        """Write a kind-5 error frame now (ahead of anything websockets queued, e.g. its close frame)."""
        frame = Frame(Opcode.BINARY, protocol.encode_error(message))
        self.transport.write(frame.serialize(mask=False, extensions=self.conn.extensions))

    def _refuse(self, reason: str, message: str) -> None:
        """Close this connection for a transport rule: kind-5 ``message`` (if a session runs), close 1008."""
        if self.transport.is_closing() or self.close_sent:
            return
        self.counters.inc(reason)
        logger.info("closing websocket from %s: %s", self.client, message)
        if self.handshake_complete:
            self._write_error(message)
            self.conn.send_close(CLOSE_POLICY, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.queue.put_nowait({"type": "websocket.disconnect", "code": CLOSE_POLICY, "reason": reason})
        self.close_sent = True
        self.transport.close()


# ----------------------------------------------------------------------------------------------
# Configuration and logging


def harden_config(config, limits: TransportLimits, counter=None) -> None:
    """Install the bounded protocols and uvicorn options on ``config`` (before the server starts)."""
    counters = TransportCounters(counter)
    http_class = type("BoundedHttpProtocol", (DuplexHttpProtocol,), {"limits": limits, "counters": counters})
    ws_class = type("BoundedWebSocketProtocol", (DuplexWebSocketProtocol,), {"limits": limits, "counters": counters})
    config.http = http_class
    config.ws = ws_class
    config.ws_max_size = limits.max_message_bytes  # one limit: the transport's is the application's
    config.ws_max_queue = 1  # uvicorn's sansio protocol pauses reading per message anyway
    config.ws_ping_interval = KEEPALIVE_PING_SECONDS
    config.ws_ping_timeout = KEEPALIVE_TIMEOUT_SECONDS
    config.ws_per_message_deflate = False  # Opus does not compress; deflate costs memory per connection
    config.h11_max_incomplete_event_size = MAX_REQUEST_HEAD_BYTES
    config.timeout_keep_alive = 5
    config.server_header = False  # no "server: uvicorn"
    for name in ("uvicorn.access", "uvicorn.error"):
        log = logging.getLogger(name)
        for kind in (RedactQueryFilter, FloodLogFilter):
            if not any(isinstance(f, kind) for f in log.filters):
                log.addFilter(kind())
