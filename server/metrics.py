"""Prometheus metrics of one server app (own CollectorRegistry) and structured session logs."""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import asdict, dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

session_logger = logging.getLogger("duplex.server.sessions")

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Step stages take from tens of microseconds (tiny model) to tens of milliseconds (7B on a GPU).
_STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.04, 0.06,
                 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
# A user frame's server-side latency: one step plus waiting for the tick (real time) up to seconds (backlog).
_FRAME_LATENCY_BUCKETS = (0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0,
                          2.0, 5.0, 10.0)
RECENT_FRAME_LATENCIES = 100_000  # raw latencies kept for exact percentiles (benchmarks)


class ServerMetrics:
    """Every metric the server exports, registered in a registry private to one app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.active_sessions = Gauge("duplex_active_sessions", "Sessions holding a batch slot", registry=r)
        self.queue_length = Gauge("duplex_queue_length", "Clients waiting for a free slot", registry=r)
        self.max_sessions = Gauge("duplex_max_sessions", "Batch slots (--max-sessions)", registry=r)
        self.step_seconds = Histogram(
            "duplex_step_seconds", "Latency of one batched tick, by stage (encode, lm, decode, total)",
            ["stage"], buckets=_STEP_BUCKETS, registry=r,
        )
        self.tick_batch = Histogram(
            "duplex_tick_sessions", "Sessions with a real (not silence) frame in a tick",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r,
        )
        self.ticks = Counter("duplex_ticks", "Batched model steps run", registry=r)
        self.frames_in = Counter("duplex_frames_in", "User audio frames stepped", registry=r)
        self.frames_out = Counter(
            "duplex_frames_out", "Model audio frames sent (counted once the websocket send of the Ogg page "
            "carrying them completed; frames never sent count as dropped, out)", registry=r,
        )
        self.frames_late = Counter(
            "duplex_frames_late", "Frames stepped as silence for a session that had none (0 with an engine "
            "that has a ready mask)", registry=r,
        )
        self.frames_dropped = Counter(
            "duplex_frames_dropped", "Frames discarded: in = user audio sent before the session started "
            "(while queued; never decoded), out = model frames never sent (client too slow or gone)",
            ["direction"], registry=r,
        )
        self.bytes = Counter("duplex_bytes", "Websocket payload bytes", ["direction"], registry=r)
        self.sessions_ended = Counter("duplex_sessions_ended", "Finished sessions by reason", ["reason"],
                                      registry=r)
        self.loop_lag = Histogram(
            "duplex_event_loop_lag_seconds", "How late the event loop (sockets, Opus) ran a 20 ms timer",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0), registry=r,
        )
        self.loop_lag_max = Gauge("duplex_event_loop_lag_max_seconds",
                                  "The event loop's worst lag of the last 10 s", registry=r)
        self.rejected = Counter("duplex_rejected", "Connections refused before a session started", ["reason"],
                                registry=r)
        self.refused = Counter(
            "duplex_refused_requests", "Requests refused before any session (HTTP status): rate_limited, "
            "forbidden_origin, unauthorized, too_many_connections; bad_audio / no_audio = a session closed "
            "for an invalid Ogg stream / for sending no audio after its handshake", ["reason"], registry=r,
        )
        self.transport_closed = Counter(
            "duplex_transport_closed", "Connections closed by a transport bound: handshake_timeout, "
            "bad_request_head, message_too_big, fragment_timeout, ping_flood; pong_dropped counts pongs not "
            "queued to a client that does not read", ["reason"], registry=r,
        )
        self.draining = Gauge("duplex_draining", "1 while the server drains (stops admitting, then exits)",
                              registry=r)
        self.frame_latency = Histogram(
            "duplex_frame_latency_seconds", "User frame complete at the server (decoded) -> the websocket send "
            "of the model audio of the step that consumed it completed", buckets=_FRAME_LATENCY_BUCKETS, registry=r,
        )
        self.recent_frame_latencies: deque[float] = deque(maxlen=RECENT_FRAME_LATENCIES)  # raw seconds
        self.session_lag = Gauge(
            "duplex_session_lag_seconds", "How far each slot's conversation runs behind real time (0 = on time; "
            "a client's own pauses and jitter do not count)", ["slot"], registry=r,
        )
        self.max_lag = Gauge("duplex_max_lag_seconds", "The largest session lag (admission waits above "
                             "--max-lag-ms)", registry=r)
        self.real_time_factor = Gauge(
            "duplex_real_time_factor", "One batched step's compute (recent average) / 80 ms of audio: above 1 "
            "the server cannot hold its sessions in real time", registry=r,
        )
        self.catch_up_steps = Counter("duplex_catch_up_steps", "Steps run at once because a session had "
                                      "frames queued (catching up after a burst, or a client faster than "
                                      "real time)", registry=r)
        for stage in ("encode", "lm", "decode", "total"):
            self.step_seconds.labels(stage)
        for direction in ("in", "out"):
            self.frames_dropped.labels(direction)
            self.bytes.labels(direction)

    def observe_step(self, encode: float, lm: float, decode: float) -> None:
        """Record one tick's stage latencies (seconds)."""
        self.step_seconds.labels("encode").observe(encode)
        self.step_seconds.labels("lm").observe(lm)
        self.step_seconds.labels("decode").observe(decode)
        self.step_seconds.labels("total").observe(encode + lm + decode)
        self.ticks.inc()

    def observe_frame_latency(self, seconds: float) -> None:
        """Record one user frame's server-side latency (histogram and the raw recent values)."""
        self.frame_latency.observe(seconds)
        self.recent_frame_latencies.append(seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


@dataclass
class SessionRecord:
    """What the per-session log line reports when a session ends."""

    session_id: str
    client: str
    slot: int | None = None
    duration_s: float = 0.0
    queued_s: float = 0.0
    frames_in: int = 0
    frames_out: int = 0
    frames_late: int = 0
    frames_dropped_in: int = 0
    frames_dropped_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    max_audio_gap_ms: float = 0.0  # longest time between two audio pages sent (includes the client's pauses)
    end_reason: str = "unknown"

    def log(self) -> None:
        """One structured (JSON) log line."""
        fields = asdict(self)
        fields["duration_s"] = round(self.duration_s, 3)
        fields["queued_s"] = round(self.queued_s, 3)
        fields["max_audio_gap_ms"] = round(self.max_audio_gap_ms, 1)
        session_logger.info("session ended %s", json.dumps(fields, separators=(",", ":")),
                            extra={"session": fields})
