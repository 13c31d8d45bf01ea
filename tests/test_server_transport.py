"""The transport's bounds, probed with raw sockets (issue 14: items 3, 4, 5, 6, 10, 12).

Each test is a reproducer of a defect found by probing `duplex serve`: a ping flood from a client that
never reads, two message-size limits, invalid UTF-8 in a text frame, oversized request lines and query
strings, partial headers, silent connections, unfinished fragmented messages, corrupt Ogg pages, and the
missing security headers."""

from __future__ import annotations

import logging
import socket
import time
import urllib.request

import numpy as np
import pytest
import sphn
from raw_ws import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWebSocket, errors_and_close, frame, \
    parse_frames
from server_harness import live_server, load_tiny_models

from duplex.server import protocol
from duplex.server.protocol import MAX_MESSAGE_BYTES


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


@pytest.fixture(scope="module")
def server(models):
    with live_server(models, max_sessions=2, max_queue=2, handshake_seconds=0.5) as srv:
        yield srv


def counted(server, reason: str) -> float:
    return server.service.metrics.transport_closed.labels(reason)._value.get()


def session(server) -> RawWebSocket:
    ws = RawWebSocket(server.port)
    head = ws.upgrade()
    assert head.startswith("HTTP/1.1 101"), head
    return ws


def opus_pages(frames: int) -> list[bytes]:
    writer = sphn.OpusStreamWriter(24000)
    pages = [writer.append_pcm(np.zeros(1920, np.float32)) for _ in range(frames)]
    return [p for p in pages if p]


# ---------------------------------------------------------------------------------------- item 3: pings
def test_a_ping_flood_from_a_client_that_never_reads_is_cut_with_bounded_memory(server):
    before = counted(server, "ping_flood")
    ws = session(server)
    sent = 0
    try:
        for _ in range(20_000):  # never reading a byte
            ws.send(frame(OP_PING, b"x" * 100))
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    data = ws.read_all(timeout=5)
    ws.close()
    errors, code = errors_and_close(data)
    assert code == 1008 and any("too many pings" in e for e in errors), (errors, code)
    pongs = [f for f in parse_frames(data) if f[0] == OP_PONG]
    assert len(pongs) <= 25  # the burst, not 20,000 (~128 B each) queued for a client that reads nothing
    assert counted(server, "ping_flood") == before + 1
    time.sleep(0.2)
    buffered = sum(c.transport.get_write_buffer_size() for c in server.server.server_state.connections
                   if getattr(c, "transport", None) is not None and not c.transport.is_closing())
    assert buffered < 64 * 1024


def test_a_few_pings_are_answered(server):
    ws = session(server)
    for i in range(5):
        ws.send(frame(OP_PING, bytes([i])))
    time.sleep(0.3)
    ws.send(frame(OP_CLOSE, b"\x03\xe8"))
    data = ws.read_all(timeout=3)
    ws.close()
    pongs = [payload for op, payload in parse_frames(data) if op == OP_PONG]
    assert pongs == [bytes([i]) for i in range(5)]


# ---------------------------------------------------------------------------------------- item 4: size
@pytest.mark.parametrize("size", [MAX_MESSAGE_BYTES + 1, 16 << 20, 1 << 40])
def test_a_message_over_the_one_limit_gets_the_kind5_error(server, size):
    ws = session(server)
    announced = frame(OP_BINARY, b"", length=size)  # only the header: the server must not wait for the body
    ws.send(announced + b"\x01" * min(size, 4096))
    data = ws.read_all(timeout=5)
    ws.close()
    errors, code = errors_and_close(data)
    assert code == 1009
    assert errors == [f"message exceeds the limit of {MAX_MESSAGE_BYTES} bytes"]


def test_the_transport_limit_is_the_application_limit(server):
    assert server.server.config.ws_max_size == server.service.settings.max_message_bytes == MAX_MESSAGE_BYTES


# ---------------------------------------------------------------------------------------- item 5: UTF-8
def test_invalid_utf8_in_a_text_frame_gets_kind5_and_no_error_log(server, caplog):
    caplog.set_level(logging.INFO)
    ws = session(server)
    ws.send(frame(OP_TEXT, b"\xff\xfe not utf-8 \xc3"))
    data = ws.read_all(timeout=5)
    ws.close()
    errors, code = errors_and_close(data)
    assert errors and errors[0].startswith("text frames are not supported"), errors
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "Traceback" not in caplog.text


# ---------------------------------------------------------------------------------------- item 6: stages
def raw_http(server, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return received


@pytest.mark.parametrize("target_bytes, status", [(10_000, b"414"), (20_000, b"4"), (200_000, b"400")])
def test_an_oversized_upgrade_request_line_gets_a_response(server, target_bytes, status):
    ws = RawWebSocket(server.port)
    target = "/api/chat?pad=" + "a" * target_bytes
    try:
        ws.upgrade(target)
    except (BrokenPipeError, ConnectionResetError):
        pass
    ws.close()
    request = ("GET " + target + " HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    started = time.monotonic()
    response = raw_http(server, request)
    assert response.startswith(b"HTTP/1.1 " + status), response[:200]
    assert time.monotonic() - started < 3


def test_partial_headers_and_silent_connections_are_closed_with_408(server):
    before = counted(server, "handshake_timeout")
    started = time.monotonic()
    silent = raw_http(server, b"")
    partial = raw_http(server, b"GET /api/chat HTTP/1.1\r\nHost: x\r\nUpgr")
    assert silent.startswith(b"HTTP/1.1 408") and partial.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 4  # 0.5 s each (handshake_seconds), not forever
    assert counted(server, "handshake_timeout") == before + 2


def test_a_keepalive_connection_gets_a_deadline_for_its_next_head(server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHo"
    response = raw_http(server, request)
    assert response.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in response


def test_an_unfinished_fragmented_message_is_closed(server):
    before = counted(server, "fragment_timeout")
    ws = session(server)
    ws.send(frame(OP_BINARY, b"\x06", fin=False))  # a first fragment, never continued
    data = ws.read_all(timeout=5)
    ws.close()
    errors, code = errors_and_close(data)
    assert code == 1008 and errors == ["message not completed within 0.5 s"]
    assert counted(server, "fragment_timeout") == before + 1


def test_a_completed_fragmented_message_is_fine(server):
    ws = session(server)
    ws.send(frame(OP_BINARY, b"\x06", fin=False) + frame(OP_CONT, b"", fin=True))  # a ping message, in 2 parts
    time.sleep(0.8)
    ws.send(frame(OP_CLOSE, b"\x03\xe8"))
    data = ws.read_all(timeout=3)
    ws.close()
    errors, _ = errors_and_close(data)
    assert errors == []


# ---------------------------------------------------------------------------------------- item 10: Ogg
def test_a_bit_flipped_ogg_page_is_refused(server):
    pages = opus_pages(6)
    corrupt = bytearray(pages[-1])
    corrupt[len(corrupt) // 2 + 10] ^= 0x10
    ended = server.service.metrics.sessions_ended
    before = ended.labels("bad_audio")._value.get(), ended.labels("client_closed")._value.get()
    ws = session(server)
    for page in pages[:-1]:
        ws.send(frame(OP_BINARY, protocol.encode_audio(page)))
    ws.send(frame(OP_BINARY, protocol.encode_audio(bytes(corrupt))))
    data = ws.read_all(timeout=5)
    ws.close()
    errors, code = errors_and_close(data)
    assert code == 1008 and len(errors) == 1 and "CRC mismatch" in errors[0], errors
    deadline = time.monotonic() + 5  # the session's end is logged as the guard's refusal, not as a hang-up
    while ended.labels("bad_audio")._value.get() == before[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (ended.labels("bad_audio")._value.get(), ended.labels("client_closed")._value.get()) == (
        before[0] + 1, before[1])


def test_a_stream_that_does_not_start_with_opushead_is_refused(server):
    from duplex.server.ogg_check import ogg_crc

    body = b"\x80theora" + bytes(34)
    header = bytearray(b"OggS\x00\x02" + bytes(8) + b"\x01\x00\x00\x00" + bytes(4) + bytes(4) + bytes([1, len(body)]))
    page = bytes(header) + body
    page = page[:22] + ogg_crc(page).to_bytes(4, "little") + page[26:]
    ws = session(server)
    ws.send(frame(OP_BINARY, protocol.encode_audio(page)))
    data = ws.read_all(timeout=5)
    ws.close()
    errors, code = errors_and_close(data)
    assert code == 1008 and errors == [
        "audio is not a valid Ogg/Opus stream: the stream does not start with an OpusHead header "
        "(only Opus is accepted)"]


def test_ogg_crc_matches_the_bitwise_definition_and_sphn_pages_pass():
    from duplex.server.ogg_check import OggError, OggPageChecker, ogg_crc, ogg_crc_reference

    rng = np.random.default_rng(0)
    for size in (0, 1, 27, 300, 5000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert ogg_crc(data) == ogg_crc_reference(data)
    stream = b"".join(opus_pages(20))
    checker = OggPageChecker()
    for start in range(0, len(stream), 37):  # pages split across messages anywhere
        checker.feed(stream[start:start + 37])
    assert checker.pages >= 20
    with pytest.raises(OggError, match="not a valid Ogg/Opus stream: no OggS page header"):
        OggPageChecker().feed(b"RIFF....")


# ---------------------------------------------------------------------------------------- item 12: headers
def test_the_page_and_the_api_carry_security_headers_and_no_server_header(server):
    for path in ("/", "/api/info", "/healthz"):
        with urllib.request.urlopen(server.http + path, timeout=5) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
        assert "server" not in headers, headers.get("server")


def test_logs_never_record_an_api_key(caplog):
    from duplex.server.transport import RedactQueryFilter, redact_query

    assert redact_query("/api/chat?text_topk=5&api_key=s3cret-key&x=1") == "/api/chat?text_topk=5&api_key=***&x=1"
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                               ("127.0.0.1:5", "/api/chat?api_key=s3cret-key"), None)
    RedactQueryFilter().filter(record)
    assert "s3cret" not in record.getMessage()


# ---------------------------------------------------------------------------------------- item 1 (transport)
def test_backpressure_does_not_starve_the_keepalive(models, monkeypatch):
    """A client far ahead of real time: the server stops reading, so the client's pong waits behind its audio.
    The keepalive (here 0.5 s + 0.5 s) must not take that for a dead peer (it used to close 1011 at 40 s)."""
    import asyncio

    from server_harness import SlowFakeEngine, synth_audio

    from duplex.client.client import AudioEvent, DuplexClient, ErrorEvent
    from duplex.server import transport

    monkeypatch.setattr(transport, "KEEPALIVE_PING_SECONDS", 0.5)
    monkeypatch.setattr(transport, "KEEPALIVE_TIMEOUT_SECONDS", 0.5)
    with live_server(models, engine=SlowFakeEngine(1, 0.01), max_sessions=1) as server:
        assert server.server.config.ws_ping_interval == 0.5

        async def scenario():
            client = await DuplexClient.connect(server.url, timeout=10)
            connected.append(time.monotonic())
            sender = asyncio.ensure_future(client.send_pcm(synth_audio(1200, 4)))  # 96 s, as fast as TCP takes
            received, errors = [], []
            try:
                async with asyncio.timeout(7.0):
                    async for event in client:
                        if isinstance(event, AudioEvent):
                            received.append(time.monotonic())
                        elif isinstance(event, ErrorEvent):
                            errors.append(event.message)
                            break
            except TimeoutError:
                pass
            sender.cancel()
            await client.close()
            return received, errors

        connected: list[float] = []
        received, errors = asyncio.run(scenario())
    assert errors == [], errors
    assert received and received[-1] - connected[0] > 5.0  # still streaming long after 5 keepalive periods


def test_a_silent_peer_is_still_closed_by_the_keepalive(models, monkeypatch):
    from duplex.server import transport

    monkeypatch.setattr(transport, "KEEPALIVE_PING_SECONDS", 0.3)
    monkeypatch.setattr(transport, "KEEPALIVE_TIMEOUT_SECONDS", 0.3)
    with live_server(models, max_sessions=1) as server:
        ws = session(server)  # never answers the pings, sends nothing
        started = time.monotonic()
        data = ws.read_all(timeout=5)
        ws.close()
    pings = [f for f in parse_frames(data) if f[0] == OP_PING]
    _, code = errors_and_close(data)
    assert pings and code == 1011 and time.monotonic() - started < 4


def test_a_burst_sent_in_one_write_is_parsed_in_slices_fully_and_in_order(server, monkeypatch):
    """A client that sends a file as fast as it can: the transport parses at most READ_SLICE_BYTES per loop
    callback (others' audio must not stall behind one connection's chunk), and every message, in order, reaches
    the session, also when the client hangs up right after the burst."""
    from duplex.server import transport

    slices = []
    parse_next = transport.DuplexWebSocketProtocol._parse_next_slice
    monkeypatch.setattr(transport.DuplexWebSocketProtocol, "_parse_next_slice",
                        lambda self: (slices.append(len(self._unparsed)), parse_next(self)))
    writer, rng = sphn.OpusStreamWriter(24000), np.random.default_rng(3)
    pages = [writer.append_pcm((0.3 * rng.standard_normal(1920)).astype(np.float32)) for _ in range(500)]
    messages = [protocol.encode_audio(p) for p in pages if p]
    assert sum(map(len, messages)) > 4 * transport.READ_SLICE_BYTES
    counter = server.service.metrics.bytes.labels("in")
    before = counter._value.get()
    ws = session(server)
    ws.send(b"".join(frame(OP_BINARY, m) for m in messages) + frame(OP_CLOSE, (1000).to_bytes(2, "big")))
    ws.sock.shutdown(socket.SHUT_WR)  # and the TCP end at once: what it sent before must still arrive
    data = ws.read_all(timeout=10)
    ws.close()
    errors, _ = errors_and_close(data)
    assert errors == []  # a page out of order or lost would break the Ogg check (CRC, sequence): a kind-5 error
    deadline = time.monotonic() + 10
    while counter._value.get() < before + sum(map(len, messages)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert counter._value.get() == before + sum(map(len, messages))
    assert slices, "the burst was never sliced (no read larger than READ_SLICE_BYTES?)"


def test_a_refusal_flood_logs_a_few_lines_and_a_summary(caplog):
    """Per status, REFUSALS_LOGGED lines a window, then one summary; websockets' duplicate lines are dropped."""
    from duplex.server import log_filters

    now = [0.0]
    flood = log_filters.FloodLogFilter(clock=lambda: now[0])

    def record(msg, *args):
        return logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, msg, args, None)

    kept = [flood.filter(record(log_filters.UVICORN_WS_STATUS, "1.2.3.4:5", "/api/chat", 429)) for _ in range(50)]
    assert kept == [True] * log_filters.REFUSALS_LOGGED + [False] * (50 - log_filters.REFUSALS_LOGGED)
    assert flood.filter(record(log_filters.UVICORN_WS_STATUS, "1.2.3.4:5", "/api/chat", 403))  # its own budget
    assert not flood.filter(record("connection rejected (%d %s)", 429, "Too Many Requests"))
    assert flood.filter(record('%s - "WebSocket %s" [accepted]', "1.2.3.4:5", "/api/chat"))
    now[0] = log_filters.REFUSAL_WINDOW_S + 1
    with caplog.at_level(logging.WARNING, logger="duplex.server.log_filters"):
        assert flood.filter(record(log_filters.UVICORN_WS_STATUS, "1.2.3.4:5", "/api/chat", 429))
    assert "40 more websocket refusals with status 429" in caplog.text
