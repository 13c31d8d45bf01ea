"""The ASGI guard in front of the app: who may connect, how often, and what the page's responses carry.

Every websocket upgrade to ``/api/chat`` is checked *before* it is accepted, in this order, and refused
with an HTTP status (no session, no model work) and a one-line text body:

==========================  ======  ==========================================================
check                       status  rule
==========================  ======  ==========================================================
connection rate             429     at most ``client_connections_per_minute`` per client address
                                    (token bucket, burst of a tenth of a minute's worth, >= 5)
origin                      403     a browser's ``Origin`` must be allowed (see :func:`origin_allowed`);
                                    no ``Origin`` (CLI clients) is fine
API key                     401     with keys configured: ``Authorization: Bearer KEY`` or ``?api_key=KEY``
concurrent connections      429     at most ``max_client_connections`` open per client address
==========================  ======  ==========================================================

A server that is draining, shutting down or failed still accepts and answers with the session's kind-5
error (a message a browser can show); load balancers learn it from ``/readyz`` first.
Each refusal counts in ``duplex_refused_requests{reason}``. HTTP API endpoints (``/api/info``,
``/api/capacity``, ``/metrics``) need the key too when keys are configured; the page, its files,
``/healthz`` and ``/readyz`` never do. Every HTTP response gets the security headers of
:data:`SECURITY_HEADERS`. Audio messages of an accepted session pass an :class:`OggPageChecker`; a bad
page ends the session with a kind-5 error and close 1008, and so does a client that sends no audio within
``first_audio_seconds`` of its handshake (see :class:`GuardedChat`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import urllib.parse
from typing import TYPE_CHECKING

from duplex.server import protocol
from duplex.server.ogg_check import OggError, OggPageChecker

if TYPE_CHECKING:
    from duplex.server.service import DuplexService

logger = logging.getLogger(__name__)

CHAT_PATH = "/api/chat"
PROTECTED_HTTP_PATHS = ("/api/info", "/api/capacity", "/metrics")
KEY_QUERY_PARAM = "api_key"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")

# The web UI loads only its own scripts, styles, worklets and API; data: for the inline SVG icon.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"permissions-policy", b"microphone=(self), camera=(), geolocation=()"),
)


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _query(scope: dict) -> list[tuple[str, str]]:
    return urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)


def presented_key(scope: dict) -> str | None:
    """The API key of a request: ``Authorization: Bearer KEY``, else the ``api_key`` query parameter."""
    auth = _header(scope, b"authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for name, value in _query(scope):
        if name == KEY_QUERY_PARAM:
            return value
    return None


def key_matches(presented: str | None, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every configured key (no early exit on a match)."""
    if presented is None:
        return False
    given = presented.encode("utf-8", errors="replace")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode("utf-8"))
    return matched


def origin_allowed(origin: str, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Is a browser's ``Origin`` allowed?

    ``allowed`` empty: the server's own host (the request's ``Host``: same host and port) or a loopback
    host (``localhost``, ``127.0.0.1``, ``[::1]``, any port). Otherwise: an exact origin of ``allowed``
    (``scheme://host[:port]``), or ``*`` for any. ``null`` (sandboxed pages, files) is never allowed unless
    ``*`` is given.
    """
    origin = origin.strip()
    if "*" in allowed:
        return True
    if allowed:
        return origin.rstrip("/").lower() in {a.rstrip("/").lower() for a in allowed}
    parsed = urllib.parse.urlsplit(origin)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or "@" in parsed.netloc:
        return False  # an Origin is scheme://host[:port]: anything else is forged or broken
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        return False
    if parsed.hostname in LOCAL_HOSTS:
        return True
    return host is not None and parsed.netloc.lower() == host.strip().lower()


class ClientLimits:
    """Per-client-address connection counts and connection-rate token buckets (event loop only)."""

    MAX_TRACKED = 10_000

    def __init__(self, max_connections: int, per_minute: float) -> None:
        self.max_connections = max_connections
        self.rate = per_minute / 60.0
        self.burst = max(5.0, per_minute / 10.0)
        self.open: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow_attempt(self, client: str) -> bool:
        """Take a token for a new connection attempt; False = too many attempts lately."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        tokens, last = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self._buckets) >= self.MAX_TRACKED:
            self._prune(now)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return False
        self._buckets[client] = (tokens - 1.0, now)
        return True

    def _prune(self, now: float) -> None:
        full = [c for c, (t, last) in self._buckets.items() if t + (now - last) * self.rate >= self.burst]
        for client in full:
            del self._buckets[client]

    def can_open(self, client: str) -> bool:
        return self.max_connections <= 0 or self.open.get(client, 0) < self.max_connections

    def opened(self, client: str) -> None:
        self.open[client] = self.open.get(client, 0) + 1

    def closed(self, client: str) -> None:
        left = self.open.get(client, 1) - 1
        if left > 0:
            self.open[client] = left
        else:
            self.open.pop(client, None)


class Guard:
    """Pure ASGI middleware; ``app.add_middleware(Guard, service=service)``."""

    def __init__(self, app, service: DuplexService) -> None:
        self.app = app
        self.service = service
        settings = service.settings
        self.keys = tuple(settings.api_keys)
        self.origins = tuple(settings.allowed_origins)
        self.limits = ClientLimits(settings.max_client_connections, settings.client_connections_per_minute)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket" and scope.get("path") == CHAT_PATH:
            await self._chat(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _refused(self, reason: str) -> None:
        self.service.metrics.refused.labels(reason).inc()

    # ------------------------------------------------------------------ HTTP
    async def _http(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        protected = path in PROTECTED_HTTP_PATHS
        if protected and self.keys and not key_matches(presented_key(scope), self.keys):
            self._refused("unauthorized")
            await _plain_response(send, 401, "an API key is required: Authorization: Bearer KEY",
                                  [(b"www-authenticate", b"Bearer")])
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(n, v) for n, v in SECURITY_HEADERS if n not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    # ------------------------------------------------------------------ websocket upgrades
    def _check_upgrade(self, scope, client: str) -> tuple[int, str, str] | None:
        """(HTTP status, message, metric reason) of a refused upgrade, or None."""
        if not self.limits.allow_attempt(client):
            return 429, "too many connections from your address: slow down and retry later", "rate_limited"
        origin = _header(scope, b"origin")
        if origin is not None and not origin_allowed(origin, _header(scope, b"host"), self.origins):
            return 403, f"origin {origin!r} is not allowed to use this server", "forbidden_origin"
        if self.keys and not key_matches(presented_key(scope), self.keys):
            return 401, "an API key is required (Authorization: Bearer KEY or ?api_key=KEY)", "unauthorized"
        if not self.limits.can_open(client):
            return (429, f"too many open connections from your address (at most {self.limits.max_connections})",
                    "too_many_connections")
        return None

    async def _chat(self, scope, receive, send) -> None:
        client = scope["client"][0] if scope.get("client") else "?"
        refusal = self._check_upgrade(scope, client)
        if refusal is not None:
            status, message, reason = refusal
            self._refused(reason)
            connect = await receive()
            if connect.get("type") == "websocket.connect":
                await _websocket_refusal(send, status, message)
            return
        self.limits.opened(client)
        try:
            chat = GuardedChat(receive, send, self.service)
            scope[GUARD_SCOPE_KEY] = chat  # the session reads why the guard closed it (its end reason)
            await self.app(scope, chat.receive, chat.send)
        finally:
            self.limits.closed(client)


GUARD_SCOPE_KEY = "duplex.guard"  # the connection's GuardedChat, in the ASGI scope


def guard_refusal(scope) -> str | None:
    """Why the guard closed this connection (``bad_audio``, ``no_audio``), or None."""
    chat = scope.get(GUARD_SCOPE_KEY)
    return getattr(chat, "refusal", None)


class GuardedChat:
    """The (receive, send) pair the app sees for one accepted /api/chat connection.

    * every kind-1 message passes an :class:`OggPageChecker` first;
    * after the handshake (kind 0) the client must send audio within ``first_audio_seconds`` (0 = no
      deadline), else the session ends with a kind-5 error: a silent client does not hold a slot.

    A refusal sends the kind-5 error and close 1008 itself; the app then reads a disconnect, and its later
    sends fail as they would for a client that left.
    """

    def __init__(self, receive, send, service: DuplexService) -> None:
        self._receive, self._send = receive, send
        self.service = service
        self.checker = OggPageChecker()
        self.closed = False
        self.refusal: str | None = None  # the reason of the guard's refusal, once it closed the connection
        self.audio_seen = False
        self._timer: asyncio.TimerHandle | None = None

    async def receive(self) -> dict:
        if self.closed:
            return {"type": "websocket.disconnect", "code": 1008}
        message = await self._receive()
        data = message.get("bytes") if message.get("type") == "websocket.receive" else None
        if data and data[0] == protocol.MessageKind.AUDIO:
            self.audio_seen = True
            self._cancel_timer()
            try:
                self.checker.feed(data[1:])
            except OggError as exc:
                await self.refuse("bad_audio", str(exc))
                return {"type": "websocket.disconnect", "code": 1008}
        elif message.get("type") == "websocket.disconnect":
            self._cancel_timer()
        return message

    async def send(self, message: dict) -> None:
        if self.closed:
            if message.get("type") == "websocket.send":
                raise ConnectionError("the session was closed by the server's guard")
            return  # the close was sent already
        await self._send(message)
        data = message.get("bytes") if message.get("type") == "websocket.send" else None
        deadline = self.service.settings.first_audio_seconds
        if data and data[0] == protocol.MessageKind.HANDSHAKE and deadline > 0 and not self.audio_seen:
            self._timer = asyncio.get_running_loop().call_later(deadline, self._no_audio, deadline)
        elif message.get("type") == "websocket.close":
            self._cancel_timer()

    def _no_audio(self, deadline: float) -> None:
        self._timer = None
        if not self.audio_seen and not self.closed:
            text = f"no audio received within {deadline:g} s of the start of the session"
            asyncio.ensure_future(self.refuse("no_audio", text))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def refuse(self, reason: str, text: str) -> None:
        """End the connection with a kind-5 ``text`` and close 1008 (counted by ``reason``)."""
        if self.closed:
            return
        self.closed = True
        self.refusal = reason
        self._cancel_timer()
        self.service.metrics.refused.labels(reason).inc()
        try:
            await self._send({"type": "websocket.send", "bytes": protocol.encode_error(text)})
            await self._send({"type": "websocket.close", "code": 1008})
        except Exception:  # noqa: BLE001 - the client is gone already
            logger.debug("could not send the refusal %r", text, exc_info=True)


async def _plain_response(send, status: int, text: str, headers: list | None = None) -> None:
    body = (text + "\n").encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *SECURITY_HEADERS, *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def _websocket_refusal(send, status: int, text: str) -> None:
    """Refuse an upgrade with an HTTP response (ASGI websocket.http.response extension)."""
    body = (text + "\n").encode()
    await send({"type": "websocket.http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "websocket.http.response.body", "body": body})
