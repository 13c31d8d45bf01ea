"""The Kyutai binary websocket protocol: message kinds, encoding, parsing and query parameters.

One websocket *binary* message = 1 kind byte + payload:

====  =========  =====================================================================
kind  name       payload
====  =========  =====================================================================
0     handshake  server -> client once the session is ready: u32 protocol version (0) +
                 u32 model version, little-endian
1     audio      Ogg pages of Opus, 24 kHz mono (both directions)
2     text       UTF-8 piece of the model's inner monologue (server -> client)
3     control    ignored
4     metadata   UTF-8 JSON object
5     error      UTF-8 message; the sender closes the connection afterwards
6     ping       ignored (keep-alive)
====  =========  =====================================================================

Unknown kinds are ignored. This module only encodes, parses and validates; it does no I/O.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, Collection, Mapping

PROTOCOL_VERSION = 0
# The audio on the wire, both ways: 24 kHz mono Ogg/Opus, cut by the server into 80 ms model frames.
SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # samples per 80 ms frame: one model step
FRAME_RATE = SAMPLE_RATE / FRAME_SIZE  # 12.5 steps per second
MODEL_VERSION = 0
# A 80 ms Opus page is a few hundred bytes; anything near this size is not a sane audio message. The one
# message-size limit of the server: the transport (uvicorn's ws_max_size) and the session use it.
MAX_MESSAGE_BYTES = 1 << 18

_HANDSHAKE = struct.Struct("<II")


class MessageKind(IntEnum):
    """The first byte of every binary message."""

    HANDSHAKE = 0
    AUDIO = 1
    TEXT = 2
    CONTROL = 3
    METADATA = 4
    ERROR = 5
    PING = 6


class ProtocolError(ValueError):
    """A message that breaks the protocol; the message text is meant for the peer."""


@dataclass(frozen=True)
class Message:
    """A parsed message. ``kind`` is None for kinds this protocol does not define (ignore them)."""

    kind: MessageKind | None
    payload: bytes
    raw_kind: int


def parse_message(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Split a binary message into kind and payload; raise ProtocolError for empty or oversized ones."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary message, got {type(data).__name__}")
    if len(data) == 0:
        raise ProtocolError("empty message: every message starts with a kind byte")
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    raw_kind = data[0]
    try:
        kind: MessageKind | None = MessageKind(raw_kind)
    except ValueError:
        kind = None
    return Message(kind=kind, payload=bytes(data[1:]), raw_kind=raw_kind)


def encode_handshake(protocol_version: int = PROTOCOL_VERSION, model_version: int = MODEL_VERSION) -> bytes:
    """Kind 0: the session is ready."""
    return bytes([MessageKind.HANDSHAKE]) + _HANDSHAKE.pack(protocol_version, model_version)


def decode_handshake(payload: bytes) -> tuple[int, int]:
    """(protocol version, model version) of a handshake payload."""
    if len(payload) < _HANDSHAKE.size:
        raise ProtocolError(f"handshake payload of {len(payload)} bytes, expected {_HANDSHAKE.size}")
    return _HANDSHAKE.unpack_from(payload)


def encode_audio(ogg_bytes: bytes) -> bytes:
    """Kind 1: Ogg/Opus bytes."""
    return bytes([MessageKind.AUDIO]) + ogg_bytes


def encode_text(piece: str) -> bytes:
    """Kind 2: one text piece."""
    return bytes([MessageKind.TEXT]) + piece.encode("utf-8")


def encode_metadata(data: Mapping[str, Any]) -> bytes:
    """Kind 4: a JSON object."""
    return bytes([MessageKind.METADATA]) + json.dumps(data, separators=(",", ":")).encode("utf-8")


def decode_metadata(payload: bytes) -> dict:
    """The JSON object of a metadata payload."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"metadata is not UTF-8 JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"metadata must be a JSON object, got {type(data).__name__}")
    return data


def encode_error(message: str) -> bytes:
    """Kind 5: an error; close the connection after sending it."""
    return bytes([MessageKind.ERROR]) + message.encode("utf-8")


def encode_ping() -> bytes:
    """Kind 6: keep-alive."""
    return bytes([MessageKind.PING])


# ----------------------------------------------------------------------------------------------
# Query parameters

# name -> (type, low, high); bounds are inclusive.
_NUMERIC_PARAMS: dict[str, tuple[type, float, float]] = {
    "text_temperature": (float, 0.0, 10.0),
    "audio_temperature": (float, 0.0, 10.0),
    "text_topk": (int, 1, 1_000_000),
    "audio_topk": (int, 1, 1_000_000),
    "text_seed": (int, 0, 2**63 - 1),
    "audio_seed": (int, 0, 2**63 - 1),
}
# Accepted for compatibility with Kyutai's clients, validated, and reported as unsupported.
_UNSUPPORTED_PARAMS: dict[str, tuple[type, float, float]] = {
    "pad_mult": (float, -100.0, 100.0),
    "repetition_penalty": (float, 0.0, 100.0),
    "repetition_penalty_context": (int, 0, 1_000_000),
}


@dataclass(frozen=True)
class SessionParams:
    """Per-session sampling overrides; None = the server's default."""

    text_temperature: float | None = None
    text_topk: int | None = None
    audio_temperature: float | None = None
    audio_topk: int | None = None
    text_seed: int | None = None
    audio_seed: int | None = None
    adapter: str | None = None  # LoRA adapter name; None: the base model
    unsupported: dict[str, float] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()

    def given(self) -> dict[str, Any]:
        """The overrides the client actually sent (for the session metadata)."""
        return {k: v for k, v in asdict(self).items() if v is not None and k not in ("unsupported", "ignored")}


def parse_query_params(query, adapters: Collection[str] | None = None) -> SessionParams:
    """Validate the websocket URL's query parameters; ValueError names the bad parameter.

    ``query``: a mapping, a sequence of (name, value) pairs, or starlette's ``QueryParams`` (whose
    repeated keys are seen). A parameter given twice is refused (which value was meant is unknowable).
    Numbers must be plain ASCII decimals: ``-?digits`` for integers, ``-?digits[.digits]`` for floats (no
    spaces, signs other than ``-``, ``_``, exponents, ``nan``/``inf`` or non-ASCII digits).
    Unknown parameters (other clients send e.g. ``worker_auth_id``) are not an error: they are
    returned in ``ignored`` and reported back in the session metadata. ``adapters``: the names
    ``adapter=NAME`` may take (None: not checked here).
    """
    pairs = _query_pairs(query)
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"query parameter(s) given more than once: {', '.join(repeated)}")
    values: dict[str, Any] = {}
    unsupported: dict[str, float] = {}
    ignored = []
    for name, text in pairs:
        if name == "adapter":
            values["adapter"] = _check_adapter(text, adapters)
        elif name in _NUMERIC_PARAMS:
            values[name] = _parse_number(name, text, *_NUMERIC_PARAMS[name])
        elif name in _UNSUPPORTED_PARAMS:
            unsupported[name] = _parse_number(name, text, *_UNSUPPORTED_PARAMS[name])
        elif name not in _ACCESS_PARAMS:
            ignored.append(name)
    return SessionParams(**values, unsupported=unsupported, ignored=tuple(sorted(ignored)))


# Read by the server's guard (the API key), never reported back.
_ACCESS_PARAMS = ("api_key",)
_INTEGER = re.compile(r"-?[0-9]+", re.ASCII)
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)
_MAX_NUMBER_CHARS = 40


def _check_adapter(name: str, adapters: Collection[str] | None) -> str:
    """The adapter=NAME parameter: a name this server has."""
    if adapters is not None and name not in adapters:
        known = ", ".join(sorted(adapters)) or "none"
        raise ValueError(f"unknown adapter {name!r} (query parameter adapter; this server has: {known})")
    return name


def _query_pairs(query) -> list[tuple[str, str]]:
    if hasattr(query, "multi_items"):
        return list(query.multi_items())
    if isinstance(query, Mapping):
        return list(query.items())
    return [(str(name), str(value)) for name, value in query]


def _parse_number(name: str, text: str, kind: type, low: float, high: float) -> Any:
    """Parse one numeric parameter strictly and check its range."""
    pattern = _INTEGER if kind is int else _DECIMAL
    if not isinstance(text, str) or len(text) > _MAX_NUMBER_CHARS or not pattern.fullmatch(text):
        shown = str(text)[:_MAX_NUMBER_CHARS]
        if shown.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise ValueError(f"query parameter {name}={shown!r} must be a finite number")
        rule = "plain ASCII digits" if kind is int else "plain ASCII digits with an optional '.'"
        raise ValueError(f"query parameter {name}={shown!r} is not a valid {kind.__name__} ({rule})")
    value = int(text, 10) if kind is int else float(text)
    if not low <= value <= high:
        raise ValueError(f"query parameter {name}={value} is out of range [{low}, {high}]")
    return value
