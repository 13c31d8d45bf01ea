"""Log filters of `duplex serve` (installed on uvicorn's loggers by :func:`duplex.server.transport.harden_config`).

* :class:`RedactQueryFilter`: no API key (query parameter or header) reaches the log.
* :class:`FloodLogFilter`: a flood of refused connections does not become a flood of log lines. The
  websockets library's own line per handshake ("connection open", "connection rejected (429 ...)") repeats
  uvicorn's, so it is dropped; of uvicorn's per-connection refusal lines (``"WebSocket /api/chat" 429``)
  at most :data:`REFUSALS_LOGGED` per status and :data:`REFUSAL_WINDOW_S` are logged, then one summary line
  counts the rest. Every refusal is still counted in ``/metrics``.
"""

from __future__ import annotations

import logging
import re
import time

logger = logging.getLogger(__name__)

REFUSALS_LOGGED = 10  # refusal lines per status code and window
REFUSAL_WINDOW_S = 10.0
WEBSOCKETS_DUPLICATES = ("connection open", "connection rejected (%d %s)", "HTTP response sent (%d %s)")
UVICORN_WS_STATUS = '%s - "WebSocket %s" %d'


class FloodLogFilter(logging.Filter):
    """See the module docstring; ``clock`` for tests."""

    def __init__(self, clock=time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self._window: dict[int, tuple[float, int, int]] = {}  # status -> (window start, logged, suppressed)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in WEBSOCKETS_DUPLICATES:
            return False
        if record.msg != UVICORN_WS_STATUS or not isinstance(record.args, tuple) or len(record.args) != 3:
            return True
        status = record.args[2]
        now = self.clock()
        start, logged, suppressed = self._window.get(status, (now, 0, 0))
        if now - start >= REFUSAL_WINDOW_S:
            if suppressed:
                logger.warning("%d more websocket refusals with status %s in the last %.0f s were not logged "
                               "(duplex_refused_requests_total in /metrics counts them all)", suppressed, status, now - start)
            start, logged, suppressed = now, 0, 0
        keep = logged < REFUSALS_LOGGED
        self._window[status] = (start, logged + keep, suppressed + (not keep))
        return keep


SECRET_HEADERS = ("authorization", "cookie", "proxy-authorization")
SECRET_PARAMS = ("api_key", "key", "token", "access_token", "auth", "password")
_SECRET = re.compile(r"([?&](?:%s)=)[^&\s\"']*" % "|".join(SECRET_PARAMS), re.IGNORECASE)


def redact_query(text: str) -> str:
    """``text`` with the values of secret query parameters (api_key=...) replaced by ``***``."""
    return _SECRET.sub(r"\1***", text)


class RedactQueryFilter(logging.Filter):
    """Rewrites log records so that no API key in a query string reaches the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            args = [redact_query(a) if isinstance(a, str) else a for a in record.args]
            for i in range(len(args) - 1):  # websockets' debug log of headers: ("< %s: %s", name, value)
                if isinstance(args[i], str) and args[i].lower() in SECRET_HEADERS:
                    args[i + 1] = "***"
            record.args = tuple(args)
        elif isinstance(record.msg, str):
            record.msg = redact_query(record.msg)
        return True
