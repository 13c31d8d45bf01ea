"""The binary message format and the query-parameter validation."""

from __future__ import annotations

import struct

import pytest

from duplex.server import protocol
from duplex.server.protocol import MessageKind, ProtocolError


def test_handshake_bytes_are_kyutai_format():
    data = protocol.encode_handshake()
    assert data == b"\x00" + struct.pack("<II", 0, 0)
    assert protocol.encode_handshake(0, 7) == b"\x00\x00\x00\x00\x00\x07\x00\x00\x00"
    message = protocol.parse_message(data)
    assert message.kind is MessageKind.HANDSHAKE
    assert protocol.decode_handshake(message.payload) == (0, 0)
    with pytest.raises(ProtocolError, match="handshake payload of 3 bytes"):
        protocol.decode_handshake(b"abc")


@pytest.mark.parametrize(
    "encoded, kind, payload",
    [
        (protocol.encode_audio(b"OggS..."), MessageKind.AUDIO, b"OggS..."),
        (protocol.encode_text(" héllo"), MessageKind.TEXT, " héllo".encode()),
        (protocol.encode_error("busy"), MessageKind.ERROR, b"busy"),
        (protocol.encode_ping(), MessageKind.PING, b""),
        (b"\x03\x01", MessageKind.CONTROL, b"\x01"),
    ],
)
def test_round_trip(encoded, kind, payload):
    message = protocol.parse_message(encoded)
    assert (message.kind, message.payload, message.raw_kind) == (kind, payload, int(kind))


def test_metadata_round_trip_and_bad_json():
    encoded = protocol.encode_metadata({"queue_position": 2, "type": "queue"})
    assert encoded[0] == 4
    assert protocol.decode_metadata(protocol.parse_message(encoded).payload) == {"queue_position": 2, "type": "queue"}
    with pytest.raises(ProtocolError, match="not UTF-8 JSON"):
        protocol.decode_metadata(b"{nope")
    with pytest.raises(ProtocolError, match="JSON object"):
        protocol.decode_metadata(b"[1, 2]")


def test_bad_messages():
    with pytest.raises(ProtocolError, match="empty message"):
        protocol.parse_message(b"")
    with pytest.raises(ProtocolError, match="exceeds the limit of 10 bytes"):
        protocol.parse_message(b"\x01" + b"x" * 10, max_bytes=10)
    with pytest.raises(ProtocolError, match="binary message"):
        protocol.parse_message("text")  # type: ignore[arg-type]
    unknown = protocol.parse_message(b"\x2a\x01\x02")
    assert unknown.kind is None and unknown.raw_kind == 42 and unknown.payload == b"\x01\x02"


def test_query_params_parsed_and_reported():
    params = protocol.parse_query_params({
        "text_temperature": "0.7", "text_topk": "25", "audio_temperature": "0.8", "audio_topk": "250",
        "text_seed": "1", "audio_seed": "42", "pad_mult": "0", "repetition_penalty": "1.1",
        "repetition_penalty_context": "64", "worker_auth_id": "abc",
    })
    assert params.given() == {"text_temperature": 0.7, "text_topk": 25, "audio_temperature": 0.8,
                              "audio_topk": 250, "text_seed": 1, "audio_seed": 42}
    assert params.unsupported == {"pad_mult": 0.0, "repetition_penalty": 1.1, "repetition_penalty_context": 64}
    assert params.ignored == ("worker_auth_id",)
    assert protocol.parse_query_params({}).given() == {}


@pytest.mark.parametrize(
    "query, message",
    [
        ({"text_temperature": "hot"}, "text_temperature='hot' is not a valid float"),
        ({"audio_temperature": "nan"}, "must be a finite number"),
        ({"text_temperature": "-1"}, "text_temperature=-1.0 is out of range"),
        ({"text_topk": "2.5"}, "text_topk='2.5' is not a valid int"),
        ({"audio_topk": "0"}, "audio_topk=0 is out of range"),
        ({"audio_seed": "-3"}, "audio_seed=-3 is out of range"),
        ({"repetition_penalty": "x"}, "repetition_penalty='x' is not a valid float"),
    ],
)
def test_query_params_rejected_with_clear_message(query, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        protocol.parse_query_params(query)
