"""DuplexService: everything one running server shares (engine, scheduler, admission, metrics)."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import socket
from dataclasses import dataclass, field
from typing import Any

from duplex.server.admission import Admission
from duplex.server.engine import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, DuplexEngine
from duplex.server.loop_monitor import LoopLagMonitor
from duplex.server.metrics import ServerMetrics
from duplex.server.protocol import MAX_MESSAGE_BYTES, MODEL_VERSION, PROTOCOL_VERSION, SessionParams
from duplex.server.request import SAMPLING_RULE, SlotRequest, resolve_request  # noqa: F401 - re-exported
from duplex.server.scheduler import Scheduler, failure_message

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """Tunables of one server (the `duplex serve` flags)."""

    max_sessions: int = 4  # batch slots
    # The fewest rows a model step computes (None: the engine's default, 4 with more than one slot, which makes
    # every answer independent of its neighbours; 1 = cheapest on CPUs, answers may differ in the last bits).
    min_step_rows: int | None = None
    max_queue: int = 16  # clients allowed to wait for a slot
    max_session_seconds: float = 0.0  # 0 = no limit
    max_lag_ms: float = 1000.0  # admission waits while a session runs this far behind real time (0 = never)
    hard_lag_ms: float = 15000.0  # a session this far behind real time ends with a kind-5 error (0 = never)
    inbox_frames: int = 8  # decoded user frames buffered per session (backpressure beyond)
    outbox_frames: int = 50  # unsent model frames before a client is dropped as too slow (4 s)
    drain_seconds: float = 2.0  # how long a finishing session may flush its output
    max_message_bytes: int = MAX_MESSAGE_BYTES  # larger websocket messages are refused with a kind-5 error
    send_tokens: bool = False  # debug/test hook: also send each frame's token ids as kind-4 metadata
    torch_threads: int | None = None  # intra-op threads of the model worker (None = torch's default)
    # Access and limits outside the session (see duplex.server.guard and duplex.server.transport).
    api_keys: tuple[str, ...] = ()  # non-empty: every websocket and API request needs one of them
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed; () = the server's own host + localhost
    max_client_connections: int = 32  # open /api/chat connections per client address (0 = no limit)
    client_connections_per_minute: float = 600.0  # new /api/chat connections per client address (0 = no limit)
    handshake_seconds: float = 10.0  # connection -> complete request head / upgrade / finished message
    first_audio_seconds: float = 30.0  # handshake -> the client's first audio message (0 = no deadline)
    shutdown_drain_seconds: float = 30.0  # on SIGTERM: how long active calls may go on (then "server restarting")
    instance_name: str = field(default_factory=socket.gethostname)  # reported to Kyutai's web client
    metrics_port: int | None = None  # serve /metrics on this port (no key needed) instead of the main one
    demo: bool = False  # random tiny models built in memory: the page says the model speaks noise

    def __post_init__(self) -> None:
        """Refuse nonsense (nan, inf, negative sizes) with a ValueError naming the setting."""
        for name in ("max_session_seconds", "max_lag_ms", "hard_lag_ms", "drain_seconds", "handshake_seconds", "first_audio_seconds",
                     "shutdown_drain_seconds", "client_connections_per_minute"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.min_step_rows is not None and self.min_step_rows < 1:
            raise ValueError(f"min_step_rows must be >= 1, got {self.min_step_rows}")
        for name, low in (("max_sessions", 1), ("max_queue", 0), ("inbox_frames", 1), ("outbox_frames", 1),
                          ("max_message_bytes", 1), ("max_client_connections", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.handshake_seconds <= 0:
            raise ValueError(f"handshake_seconds must be > 0, got {self.handshake_seconds}")


class DuplexService:
    """Shared server state; created by the app's lifespan."""

    def __init__(self, models, settings: ServerSettings, engine: DuplexEngine | None = None) -> None:
        self.models = models
        self.settings = settings
        self.metrics = ServerMetrics()
        self.defaults = dict(models.lm_gen_defaults)
        self.engine = engine or DuplexEngine(models.mimi, models.lm, settings.max_sessions, self.defaults,
                                             device=models.device, min_rows=settings.min_step_rows)
        self.scheduler = Scheduler(self.engine, self.metrics, inbox_frames=settings.inbox_frames,
                                   torch_threads=settings.torch_threads, max_lag_s=settings.max_lag_ms / 1000.0,
                                   hard_lag_s=settings.hard_lag_ms / 1000.0)
        self.admission = Admission(settings.max_sessions, settings.max_queue, self.metrics,
                                   accepting=self.scheduler.accepting)
        self.sessions: set = set()
        self.sample_rate = SAMPLE_RATE
        self.frame_size = FRAME_SIZE
        self.shutting_down = False  # no new session starts (draining or stopping)
        self.draining = False  # SIGTERM: active calls go on for a while, nobody new is admitted
        self.stopping = False  # the final stop: every session is being ended
        self.metrics.max_sessions.set(settings.max_sessions)
        self.loop_monitor = LoopLagMonitor(self.metrics.loop_lag, self.metrics.loop_lag_max)

    def start(self) -> None:
        """Start the model worker (call on the event loop that serves the sessions)."""
        loop = asyncio.get_running_loop()

        def stop_admitting(exc: BaseException) -> None:  # from the worker thread, when the model is broken
            try:
                loop.call_soon_threadsafe(self.admission.close, failure_message(exc))
            except RuntimeError:  # the loop is closed already
                pass

        self.scheduler.on_fatal = stop_admitting
        self.scheduler.start()
        self.loop_monitor.start()

    def refusal(self) -> str | None:
        """Why no session can start now (draining, shutting down, broken model), or None."""
        if self.draining and not self.stopping:
            return "server draining"
        if self.shutting_down:
            return "server shutting down"
        if self.scheduler.error is not None:
            return failure_message(self.scheduler.error)
        return None

    def begin_drain(self) -> None:
        """Stop admitting (queued clients are told to reconnect elsewhere); active calls go on."""
        if self.shutting_down:
            return
        self.draining = self.shutting_down = True
        self.metrics.draining.set(1)
        logger.info("draining: %d active sessions continue, %d queued are sent elsewhere", len(self.sessions),
                    self.admission.queue_length)
        self.admission.close("server draining: reconnect to another server")

    async def shutdown(self, drain_timeout: float = 10.0) -> None:
        """Stop admitting, tell every connected client (kind 5), let sessions drain, stop the worker.

        After a drain the clients still connected hear "server restarting", else "server shutting down".
        """
        if not self.stopping:
            message = "server restarting" if self.draining else "server shutting down"
            self.stopping = self.shutting_down = True
            logger.info("shutting down: %d active sessions, %d queued", len(self.sessions),
                        self.admission.queue_length)
            self.admission.close(message)
            for session in list(self.sessions):
                session.finish("shutdown", message)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while (self.sessions or self.admission.active) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.scheduler.stop)
        close_engine = getattr(self.engine, "close", None)  # a ProcessEngine: its child exits
        if close_engine is not None:
            await asyncio.to_thread(close_engine)
        await self.loop_monitor.stop()

    # ------------------------------------------------------------------ capacity (load balancers)
    def capacity(self) -> dict[str, Any]:
        """GET /api/capacity: slots, active, queued, free, lag, and whether a new session starts now."""
        admission = self.admission
        report: dict[str, Any] = {
            "slots": self.settings.max_sessions,
            "active": admission.active,
            "queued": admission.queue_length,
            "max_queue": self.settings.max_queue,
            "free": max(0, self.settings.max_sessions - admission.active),
            "lag_ms": scheduler_lag_ms(self.scheduler),
            "event_loop_lag_max_ms": round(1000 * self.loop_monitor.worst(), 1),
            "draining": self.draining,
            "failed": self.scheduler.error is not None,
        }
        summary = getattr(self.scheduler, "capacity", None)  # the scheduler's own summary, where it has one
        if callable(summary):
            report.update({k: v for k, v in summary().items() if k not in ("draining", "failed")})
        report["ready"] = self.ready(report)
        return report

    def ready(self, report: dict[str, Any] | None = None) -> bool:
        """Would a new session start now (a free slot, nobody waiting, not draining or failed)?"""
        if self.refusal() is not None:
            return False
        report = report or {"free": self.settings.max_sessions - self.admission.active,
                            "queued": self.admission.queue_length}
        # "accepting" (the scheduler's summary): False while a session lags more than --max-lag-ms
        return report["free"] > 0 and report["queued"] == 0 and bool(report.get("accepting", True))

    # ------------------------------------------------------------------ per-session helpers
    def text_piece(self, token_id: int) -> str | None:
        """The text of a token, or None for padding-like ids (0 and 3 are never sent)."""
        piece = self.models.tokenizer.piece(token_id)
        return piece or None

    def sampling_for(self, params: SessionParams) -> tuple[SlotRequest, dict[str, Any]]:
        """Resolve a session's query parameters against this server's defaults."""
        return resolve_request(params, self.defaults)

    def session_metadata(self, session_id: str, params: SessionParams, resolved: dict) -> dict:
        """The kind-4 message sent right after the handshake."""
        return {
            "type": "session",
            "session_id": session_id,
            "model": self.models.model_name,
            "sample_rate": SAMPLE_RATE,
            "frame_rate": FRAME_RATE,
            "max_session_seconds": self.settings.max_session_seconds or None,
            "sampling": resolved,
            "sampling_rule": SAMPLING_RULE,
            "params": params.given(),
            "unsupported_params": sorted(params.unsupported),
            "ignored_params": list(params.ignored),
            **self.kyutai_fields(resolved),
        }

    def kyutai_fields(self, resolved: dict[str, Any] | None = None) -> dict[str, Any]:
        """The fields Kyutai's web client requires in every kind-4 object (its server-info schema).

        Values are the session's resolved sampling (or the server defaults); a greedy stream reports
        temperature 0. duplex has no padding multiplier or repetition penalty: their neutral values.
        """
        resolved = resolved or {}
        return {
            "text_temperature": float(resolved.get("temp_text", self.defaults.get("temp_text", 0.7))),
            "text_topk": int(resolved.get("top_k_text", self.defaults.get("top_k_text", 25))),
            "audio_temperature": float(resolved.get("temp", self.defaults.get("temp", 0.8))),
            "audio_topk": int(resolved.get("top_k", self.defaults.get("top_k", 250))),
            "pad_mult": 0.0,
            "repetition_penalty_context": 0,
            "repetition_penalty": 1.0,
            "lm_model_file": str(self.models.model_name),
            "instance_name": self.settings.instance_name,
            "build_info": build_info(),
        }

    @property
    def adapter_names(self) -> list[str]:
        """The LoRA adapters a session may choose (query parameter adapter=NAME)."""
        from duplex.model.lora_cli import adapter_names

        reported = getattr(self.models, "adapter_names", None)  # RemoteModels: the engine process's
        return list(reported) if reported is not None else adapter_names(getattr(self.models, "lm", None))

    def info(self) -> dict:
        """GET /api/info."""
        return {
            "model": self.models.model_name,
            "adapters": self.adapter_names,
            "device": str(self.models.device),
            "dtype": str(self.models.dtype).replace("torch.", ""),
            "sample_rate": SAMPLE_RATE,
            "frame_rate": FRAME_RATE,
            "frame_size": FRAME_SIZE,
            "protocol_version": PROTOCOL_VERSION,
            "model_version": MODEL_VERSION,
            "defaults": self.defaults,
            "max_sessions": self.settings.max_sessions,
            "max_queue": self.settings.max_queue,
            "max_session_seconds": self.settings.max_session_seconds or None,
            "active_sessions": len(self.sessions),
            "queue_length": self.admission.queue_length,
            "query_params": ["text_temperature", "text_topk", "audio_temperature", "audio_topk",
                             "text_seed", "audio_seed"],
            "unsupported_query_params": ["pad_mult", "repetition_penalty", "repetition_penalty_context"],
            "auth_required": bool(self.settings.api_keys),
            "demo": self.settings.demo,
        }


# The per-slot request and its defaults live in duplex.server.request (kept here for older imports).
resolve_sampling = resolve_request


def scheduler_lag_ms(scheduler) -> float | None:
    """How far the model loop runs behind real time, in ms: the scheduler's ``lag_seconds()`` hook when it
    has one (None until then)."""
    lag = getattr(scheduler, "lag_seconds", None)
    if not callable(lag):
        return None
    value = lag()
    return None if value is None else round(1000.0 * float(value), 1)


@functools.lru_cache(maxsize=1)
def build_info() -> dict[str, str]:
    """Strings describing this build (Kyutai's client shows them; its Rust-specific keys get duplex's values)."""
    import platform

    try:
        from importlib.metadata import version

        duplex_version = version("duplex")
    except Exception:  # noqa: BLE001 - running from a checkout without metadata
        duplex_version = "unknown"
    python = platform.python_version()
    return {
        "build_timestamp": "", "build_date": "", "git_branch": "", "git_timestamp": "", "git_date": "",
        "git_hash": "", "git_describe": f"duplex {duplex_version}",
        "rustc_host_triple": "", "rustc_version": f"python {python}", "cargo_target_triple": platform.machine(),
    }


def _pick(value, default):
    return default if value is None else value
