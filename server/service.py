"""DuplexService: everything one running server shares (engine, scheduler, admission, metrics)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from duplex.server.admission import Admission
from duplex.server.engine import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE, DuplexEngine, SlotSampling
from duplex.server.metrics import ServerMetrics
from duplex.server.protocol import MODEL_VERSION, PROTOCOL_VERSION, SessionParams
from duplex.server.scheduler import Scheduler, failure_message

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """Tunables of one server (the `duplex serve` flags)."""

    max_sessions: int = 4  # batch slots
    max_queue: int = 16  # clients allowed to wait for a slot
    max_session_seconds: float = 0.0  # 0 = no limit
    grace_ms: float = 30.0  # how long a tick waits for a late session (see scheduler)
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
        self.scheduler = Scheduler(self.engine, self.metrics, grace_s=settings.grace_ms / 1000.0,
                                   inbox_frames=settings.inbox_frames, torch_threads=settings.torch_threads)
        self.admission = Admission(settings.max_sessions, settings.max_queue, self.metrics)
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

    def sampling_for(self, params: SessionParams) -> tuple[SlotSampling, dict[str, Any]]:
        """Resolve a session's query parameters against this server's defaults."""
        return resolve_sampling(params, self.defaults)

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

    @property
    def adapter_names(self) -> list[str]:
        """The LoRA adapters a session may choose (query parameter adapter=NAME)."""
        from duplex.model.lora_cli import adapter_names

        return adapter_names(getattr(self.models, "lm", None))

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
        }


SAMPLING_RULE = (
    "per stream (text, audio): its temperature, when given, decides (0 = greedy, > 0 = sampling); else its "
    "top-k, when given, turns sampling on; else the server default applies. A parameter given for one stream "
    "never changes the other stream's mode. Greedy streams are reported with temperature 0. text_seed and "
    "audio_seed key the two streams' noise independently (the server picks any seed not given)."
)


def _stream_mode(temperature: float | None, topk: int | None, default_on: bool,
                 default_temp: float) -> tuple[bool, float]:
    """(samples?, temperature) of one stream: see SAMPLING_RULE."""
    if temperature is not None:
        return temperature > 0, float(temperature)
    if topk is not None:
        return True, float(default_temp)
    return default_on, float(default_temp)


def resolve_sampling(params: SessionParams, defaults: dict[str, Any]) -> tuple[SlotSampling, dict[str, Any]]:
    """Resolve query parameters against sampling defaults, per stream (SAMPLING_RULE); every field explicit.

    Shared by server sessions and `duplex infer`, so both sample a conversation the same way. A greedy
    stream gets temperature 0 (the LM takes the argmax of a stream whose temperature is 0).
    """
    default_on = bool(defaults.get("use_sampling", True))
    text_on, temp_text = _stream_mode(params.text_temperature, params.text_topk, default_on,
                                      defaults.get("temp_text", 0.7))
    audio_on, temp = _stream_mode(params.audio_temperature, params.audio_topk, default_on,
                                  defaults.get("temp", 0.8))
    sampling = SlotSampling(
        use_sampling=text_on or audio_on,
        temp=temp if audio_on else 0.0,
        temp_text=temp_text if text_on else 0.0,
        top_k=_pick(params.audio_topk, defaults.get("top_k", 250)),
        top_k_text=_pick(params.text_topk, defaults.get("top_k_text", 25)),
        text_seed=_pick(params.text_seed, secrets.randbits(62)),
        audio_seed=_pick(params.audio_seed, secrets.randbits(62)),
        adapter=params.adapter,
    )
    resolved = {name: value for name, value in asdict(sampling).items() if name not in ("seed", "adapter")}
    resolved.update(text_sampling=text_on, audio_sampling=audio_on)
    return sampling, resolved


def _pick(value, default):
    return default if value is None else value
