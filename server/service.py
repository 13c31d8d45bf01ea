"""DuplexService: everything one running server shares (engine, scheduler, admission, metrics)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from duplex.server.admission import Admission
from duplex.server.engine import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, DuplexEngine
from duplex.server.metrics import ServerMetrics
from duplex.server.protocol import MODEL_VERSION, PROTOCOL_VERSION, SessionParams
from duplex.server.request import SAMPLING_RULE, SlotRequest, resolve_request  # noqa: F401 - re-exported
from duplex.server.scheduler import Scheduler, failure_message

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """Tunables of one server (the `duplex serve` flags)."""

    max_sessions: int = 4  # batch slots
    max_queue: int = 16  # clients allowed to wait for a slot
    max_session_seconds: float = 0.0  # 0 = no limit
    max_lag_ms: float = 1000.0  # admission waits while a session runs this far behind real time (0 = never)
    hard_lag_ms: float = 15000.0  # a session this far behind real time ends with a kind-5 error (0 = never)
    inbox_frames: int = 8  # decoded user frames buffered per session (backpressure beyond)
    outbox_frames: int = 50  # unsent model frames before a client is dropped as too slow (4 s)
    drain_seconds: float = 2.0  # how long a finishing session may flush its output
    max_message_bytes: int = 1 << 18  # larger websocket messages are refused with a kind-5 error
    send_tokens: bool = False  # debug/test hook: also send each frame's token ids as kind-4 metadata
    torch_threads: int | None = None  # intra-op threads of the model worker (None = torch's default)


class DuplexService:
    """Shared server state; created by the app's lifespan."""

    def __init__(self, models, settings: ServerSettings, engine: DuplexEngine | None = None) -> None:
        self.models = models
        self.settings = settings
        self.metrics = ServerMetrics()
        self.defaults = dict(models.lm_gen_defaults)
        self.engine = engine or DuplexEngine(models.mimi, models.lm, settings.max_sessions, self.defaults,
                                             device=models.device)
        self.scheduler = Scheduler(self.engine, self.metrics, inbox_frames=settings.inbox_frames,
                                   torch_threads=settings.torch_threads, max_lag_s=settings.max_lag_ms / 1000.0,
                                   hard_lag_s=settings.hard_lag_ms / 1000.0)
        self.admission = Admission(settings.max_sessions, settings.max_queue, self.metrics,
                                   accepting=self.scheduler.accepting)
        self.sessions: set = set()
        self.sample_rate = SAMPLE_RATE
        self.frame_size = FRAME_SIZE
        self.shutting_down = False

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

    def refusal(self) -> str | None:
        """Why no session can start now (shutting down, broken model), or None."""
        if self.shutting_down:
            return "server shutting down"
        if self.scheduler.error is not None:
            return failure_message(self.scheduler.error)
        return None

    async def shutdown(self, drain_timeout: float = 10.0) -> None:
        """Stop admitting, tell every connected client (kind 5), let sessions drain, stop the worker."""
        if not self.shutting_down:
            self.shutting_down = True
            logger.info("shutting down: %d active sessions, %d queued", len(self.sessions),
                        self.admission.queue_length)
            self.admission.close()
            for session in list(self.sessions):
                session.finish("shutdown", "server shutting down")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while (self.sessions or self.admission.active) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self.scheduler.stop)

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
        }

    def info(self) -> dict:
        """GET /api/info."""
        return {
            "model": self.models.model_name,
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
        }


# The per-slot request and its defaults live in duplex.server.request (kept here for older imports).
resolve_sampling = resolve_request
