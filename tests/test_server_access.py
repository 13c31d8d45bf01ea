"""Access control and capacity (issue 13: items 1, 2, 3 (per-client limits), 4, 7; issue 14 item 8 live).

API keys (Bearer header or query parameter, 401 before the upgrade), the origin allowlist (403 for
evil, ``null`` and look-alike origins), per-client-address connection limits (429), /readyz and
/api/capacity, the Kyutai-compatible session metadata, and strict query parsing end to end."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest
from raw_ws import RawWebSocket
from server_harness import live_server, load_tiny_models

from duplex.client.client import DuplexClient, ServerError
from duplex.server.guard import key_matches, origin_allowed

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def models(fixtures_dir, tiny_tokenizer_path):
    return load_tiny_models(fixtures_dir, tiny_tokenizer_path)


def refused(server, reason: str) -> float:
    return server.service.metrics.refused.labels(reason)._value.get()


def upgrade_status(server, target: str = "/api/chat", headers: dict | None = None) -> str:
    ws = RawWebSocket(server.port)
    try:
        return ws.upgrade(target, headers).split("\r\n")[0]
    finally:
        ws.close()


def http_get(server, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(server.http + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# ---------------------------------------------------------------------------------------- keys
def test_keys_are_required_before_the_upgrade_and_counted(models):
    with live_server(models, api_keys=(KEY, "second-key-abcdefgh")) as server:
        assert upgrade_status(server).startswith("HTTP/1.1 401")
        assert upgrade_status(server, headers={"Authorization": "Bearer wrong-key-xxxxxxx"}).startswith(
            "HTTP/1.1 401")
        assert upgrade_status(server, headers={"Authorization": f"Bearer {KEY}"}).startswith("HTTP/1.1 101")
        assert upgrade_status(server, f"/api/chat?api_key={KEY}").startswith("HTTP/1.1 101")
        assert upgrade_status(server, "/api/chat?api_key=second-key-abcdefgh").startswith("HTTP/1.1 101")
        assert refused(server, "unauthorized") == 2
        for path in ("/api/info", "/api/capacity", "/metrics"):
            assert http_get(server, path)[0] == 401
            assert http_get(server, path, {"Authorization": f"Bearer {KEY}"})[0] == 200
        for path in ("/", "/healthz", "/readyz"):  # the page asks for the key; probes need none
            assert http_get(server, path)[0] == 200
        info = json.loads(http_get(server, "/api/info", {"Authorization": f"Bearer {KEY}"})[1])
        assert info["auth_required"] is True

        async def talk(api_key):
            client = await DuplexClient.connect(server.url, api_key=api_key, timeout=10)
            await client.close()

        asyncio.run(talk(KEY))
        with pytest.raises(ServerError, match="HTTP 401: an API key is required"):
            asyncio.run(talk(None))


def test_key_comparison():
    assert key_matches("abc-key-123", ("x" * 12, "abc-key-123"))
    assert not key_matches("abc-key-12", ("abc-key-123",))
    assert not key_matches(None, ("abc-key-123",))
    assert not key_matches("é", ("abc-key-123",))


def test_metrics_on_their_own_port(models):
    with live_server(models, api_keys=(KEY,), metrics_port=0) as server:
        assert http_get(server, "/metrics", {"Authorization": f"Bearer {KEY}"})[0] == 404
        port = server.server.metrics_http.server_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b"duplex_refused_requests" in response.read()


# ---------------------------------------------------------------------------------------- origins
@pytest.mark.parametrize("origin, allowed", [
    ("https://evil.example", False),
    ("null", False),
    ("http://localhost.evil.example", False),
    ("http://127.0.0.1.evil.example:8998", False),
    ("http://evil.example@127.0.0.1", False),
    ("http://localhost:3000", True),
    ("http://127.0.0.1:5173", True),
    ("http://[::1]:8998", True),
])
def test_origin_default_policy(origin, allowed):
    assert origin_allowed(origin, "duplex.example:8998", ()) is allowed


def test_origin_own_host_and_configured_lists():
    assert origin_allowed("https://duplex.example:8998", "duplex.example:8998", ())
    assert not origin_allowed("https://duplex.example:9999", "duplex.example:8998", ())
    assert origin_allowed("https://app.example.com", None, ("https://app.example.com",))
    assert not origin_allowed("http://localhost:3000", None, ("https://app.example.com",))
    assert origin_allowed("null", None, ("*",))


def test_a_foreign_origin_is_refused_with_403_before_any_session(models, caplog, capfd):
    import logging

    with live_server(models) as server:
        caplog.set_level(logging.INFO, logger="uvicorn.error")
        for origin in ("https://evil.example", "null", "http://localhost.evil.example"):
            assert upgrade_status(server, headers={"Origin": origin}).startswith("HTTP/1.1 403"), origin
        assert upgrade_status(server, headers={"Origin": f"http://127.0.0.1:{server.port}"}).startswith(
            "HTTP/1.1 101")
        assert upgrade_status(server).startswith("HTTP/1.1 101")  # no Origin: a CLI client
        assert refused(server, "forbidden_origin") == 3
        assert server.service.metrics.sessions_ended.labels("client_closed")._value.get() <= 2
    logged = capfd.readouterr().err + caplog.text
    assert logged.count('"WebSocket /api/chat" 403') == 3  # one line per refusal, and no error with it
    assert "without completing handshake" not in logged and "connection rejected" not in logged


# ---------------------------------------------------------------------------------------- per-client limits
def test_per_client_connection_count_and_rate(models):
    with live_server(models, max_sessions=1, max_queue=8, max_client_connections=2,
                     client_connections_per_minute=600) as server:
        first, second = RawWebSocket(server.port), RawWebSocket(server.port)
        assert first.upgrade().startswith("HTTP/1.1 101") and second.upgrade().startswith("HTTP/1.1 101")
        third = upgrade_status(server)
        assert third.startswith("HTTP/1.1 429"), third
        assert refused(server, "too_many_connections") == 1
        first.close()
        second.close()
    with live_server(models, client_connections_per_minute=60) as server:  # burst of 6, then 1 per second
        statuses = [upgrade_status(server) for _ in range(8)]
        assert sum(s.startswith("HTTP/1.1 429") for s in statuses) >= 1
        assert refused(server, "rate_limited") >= 1


# ---------------------------------------------------------------------------------------- readiness
def test_readyz_and_capacity_follow_the_slots(models):
    with live_server(models, max_sessions=1, max_queue=2) as server:
        status, body = http_get(server, "/readyz")
        assert status == 200 and json.loads(body)["status"] == "ready"
        capacity = json.loads(http_get(server, "/api/capacity")[1])
        assert {k: capacity[k] for k in ("slots", "active", "queued", "free", "ready")} == \
            {"slots": 1, "active": 0, "queued": 0, "free": 1, "ready": True}
        assert "lag_ms" in capacity

        async def occupy():
            client = await DuplexClient.connect(server.url, timeout=10)
            full = http_get(server, "/readyz")
            capacity = json.loads(http_get(server, "/api/capacity")[1])
            await client.close()
            return full, capacity

        (status, body), capacity = asyncio.run(occupy())
        assert status == 503 and json.loads(body)["status"] == "full"
        assert capacity["active"] == 1 and capacity["free"] == 0 and capacity["ready"] is False
        server.service.begin_drain()
        status, body = http_get(server, "/readyz")
        assert status == 503 and json.loads(body)["status"] == "draining"
        assert http_get(server, "/healthz")[0] == 200  # liveness stays


# ---------------------------------------------------------------------------------------- metadata, query
def test_session_metadata_satisfies_kyutais_web_client_schema(models):
    with live_server(models) as server:
        async def metadata():
            client = await DuplexClient.connect(server.url, params={"text_topk": 7}, timeout=10)
            try:
                for _ in range(20):
                    if client.session_metadata is not None:
                        return client.session_metadata
                    await client.next_event(timeout=5)
            finally:
                await client.close()

        data = asyncio.run(metadata())
    numbers = ("text_temperature", "text_topk", "audio_temperature", "audio_topk", "pad_mult",
               "repetition_penalty_context", "repetition_penalty")
    for name in numbers:
        assert isinstance(data[name], (int, float)) and not isinstance(data[name], bool), name
    assert data["text_topk"] == 7
    assert isinstance(data["lm_model_file"], str) and isinstance(data["instance_name"], str)
    build = data["build_info"]
    for name in ("build_timestamp", "build_date", "git_branch", "git_timestamp", "git_date", "git_hash",
                 "git_describe", "rustc_host_triple", "rustc_version", "cargo_target_triple"):
        assert isinstance(build[name], str), name
    assert data["type"] == "session" and "session_id" in data  # duplex's own fields stay


@pytest.mark.parametrize("query, message", [
    ("text_topk=abc&text_topk=5", "given more than once: text_topk"),
    ("text_topk=%D9%A3", "text_topk='٣' is not a valid int"),
    ("text_topk=%205", "text_topk=' 5' is not a valid int"),
    ("text_topk=1_000", "is not a valid int"),
    ("text_topk=%2B5", "is not a valid int"),
    ("text_temperature=1e-400", "text_temperature='1e-400' is not a valid float"),
])
def test_lenient_query_values_are_refused_with_a_kind5_error(models, query, message):
    with live_server(models) as server:
        async def connect():
            await DuplexClient.connect(f"{server.url}?{query}", timeout=10)

        with pytest.raises(ServerError, match=message):
            asyncio.run(connect())


def test_the_key_never_reaches_the_log(models, caplog, capfd):
    """Query keys are logged as api_key=***; not even the debug log of headers shows a Bearer key."""
    import logging

    with live_server(models, api_keys=(KEY,)) as server:
        caplog.set_level(logging.DEBUG, logger="uvicorn.error")
        caplog.set_level(logging.DEBUG, logger="uvicorn.access")
        assert upgrade_status(server, f"/api/chat?text_topk=5&api_key={KEY}").startswith("HTTP/1.1 101")
        assert upgrade_status(server, "/api/chat?api_key=wrong-key-000000").startswith("HTTP/1.1 401")
        assert upgrade_status(server, headers={"Authorization": f"Bearer {KEY}"}).startswith("HTTP/1.1 101")
        http_get(server, f"/api/info?api_key={KEY}")
        time.sleep(0.3)
    logged = capfd.readouterr().err + caplog.text
    assert "api_key=***" in logged and "WebSocket /api/chat" in logged
    assert KEY not in logged and "wrong-key-000000" not in logged


def test_a_client_that_sends_no_audio_after_the_handshake_is_ended(models):
    from duplex.client.client import ErrorEvent

    with live_server(models, max_sessions=1, first_audio_seconds=0.5) as server:
        async def silent():
            client = await DuplexClient.connect(server.url, timeout=10)
            try:
                while True:
                    event = await client.next_event(timeout=10)
                    if event is None or isinstance(event, ErrorEvent):
                        return event
            finally:
                await client.close()

        event = asyncio.run(silent())
        assert isinstance(event, ErrorEvent)
        assert event.message == "no audio received within 0.5 s of the start of the session"
        assert refused(server, "no_audio") == 1
        deadline = time.monotonic() + 10
        while server.service.admission.active:  # the slot is free again
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ended = server.service.metrics.sessions_ended  # counted once the session has closed its socket
        reasons = lambda: {r: ended.labels(r)._value.get() for r in ("no_audio", "client_closed")}  # noqa: E731
        while sum(reasons().values()) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert reasons() == {"no_audio": 1, "client_closed": 0}  # logged as the guard's end, not the client's
