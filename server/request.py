"""What one session asks of its batch slot: one request object from the query parameters to the engine.

:class:`SlotRequest` carries a session's resolved sampling settings and the LoRA adapter it wants
from the websocket query parameters (:class:`~duplex.server.protocol.SessionParams`) through the
scheduler to ``engine.join(slot, request)``. The server-side fallbacks of every setting live in
:data:`FALLBACK_DEFAULTS`, used where the model's own defaults say nothing.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any

# Used only where the loaded model's lm_gen defaults do not name the setting.
FALLBACK_DEFAULTS: dict[str, Any] = {"use_sampling": True, "temp": 0.8, "temp_text": 0.7, "top_k": 250,
                                     "top_k_text": 25}

SAMPLING_RULE = (
    "per stream (text, audio): its temperature, when given, decides (0 = greedy, > 0 = sampling); else its "
    "top-k, when given, turns sampling on; else the server default applies. A parameter given for one stream "
    "never changes the other stream's mode. Greedy streams are reported with temperature 0. text_seed and "
    "audio_seed key the two streams' noise independently (the server picks any seed not given)."
)


@dataclass(frozen=True)
class SlotRequest:
    """One slot's settings; a None field takes the engine's default."""

    use_sampling: bool | None = None
    temp: float | None = None  # audio temperature
    temp_text: float | None = None
    top_k: int | None = None  # audio top-k
    top_k_text: int | None = None
    seed: int | None = None  # both streams' seed (text_seed / audio_seed win over it)
    text_seed: int | None = None  # keys the text token's noise
    audio_seed: int | None = None  # keys the audio tokens' noise
    adapter: str | None = None  # the LoRA adapter this session asks for (None: the base model)

    def sampling(self) -> dict[str, Any]:
        """The sampling fields only (what the engine applies today)."""
        return {name: value for name, value in asdict(self).items() if name != "adapter"}


def _stream_mode(temperature: float | None, topk: int | None, default_on: bool,
                 default_temp: float) -> tuple[bool, float]:
    """(samples?, temperature) of one stream: see SAMPLING_RULE."""
    if temperature is not None:
        return temperature > 0, float(temperature)
    if topk is not None:
        return True, float(default_temp)
    return default_on, float(default_temp)


def _pick(value, default):
    return default if value is None else value


def resolve_request(params, defaults: dict[str, Any]) -> tuple[SlotRequest, dict[str, Any]]:
    """Resolve query parameters (a SessionParams) against the model's defaults, per stream (SAMPLING_RULE).

    Returns the request (every sampling field explicit) and the resolved settings reported to the
    client. Shared by server sessions and `duplex infer`, so both sample a conversation the same way.
    A greedy stream gets temperature 0 (the LM takes the argmax of a stream whose temperature is 0).
    """
    merged = {**FALLBACK_DEFAULTS, **{k: v for k, v in defaults.items() if v is not None}}
    default_on = bool(merged["use_sampling"])
    text_on, temp_text = _stream_mode(params.text_temperature, params.text_topk, default_on, merged["temp_text"])
    audio_on, temp = _stream_mode(params.audio_temperature, params.audio_topk, default_on, merged["temp"])
    request = SlotRequest(
        use_sampling=text_on or audio_on,
        temp=temp if audio_on else 0.0,
        temp_text=temp_text if text_on else 0.0,
        top_k=_pick(params.audio_topk, merged["top_k"]),
        top_k_text=_pick(params.text_topk, merged["top_k_text"]),
        text_seed=_pick(params.text_seed, secrets.randbits(62)),
        audio_seed=_pick(params.audio_seed, secrets.randbits(62)),
        adapter=getattr(params, "adapter", None),
    )
    resolved = {name: value for name, value in request.sampling().items() if name != "seed"}
    resolved.update(text_sampling=text_on, audio_sampling=audio_on)
    return request, resolved
