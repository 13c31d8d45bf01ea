"""The FastAPI application: websocket /api/chat, /healthz, /api/info, /metrics and the web UI at /.

``create_app(models, settings)`` builds the app; its lifespan starts the scheduler's worker
thread and, on exit, shuts the service down gracefully. :class:`GracefulServer` is a uvicorn
server that tells connected clients (kind 5) and drains their sessions *before* uvicorn closes
the sockets.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from duplex.server.guard import Guard
from duplex.server.metrics import CONTENT_TYPE
from duplex.server.service import DuplexService, ServerSettings
from duplex.server.session import Session
from duplex.server.transport import TransportLimits, harden_config

logger = logging.getLogger(__name__)

_NO_UI = """<!doctype html><meta charset="utf-8"><title>duplex</title>
<p>duplex server is running, but the web UI files (client/web/index.html) are missing.
Use <code>duplex talk --url ws://HOST:PORT/api/chat</code>.</p>"""


def default_web_dir() -> Path:
    """The repository's (or installed package's) client/web folder."""
    import duplex.client

    return Path(duplex.client.__file__).resolve().parent / "web"


def create_app(models, settings: ServerSettings | None = None, engine=None, web_dir: Path | None = None) -> FastAPI:
    """Build the server app around loaded models (``engine`` overrides the batched engine, for tests)."""
    settings = settings or ServerSettings()
    service = DuplexService(models, settings, engine=engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        logger.info("serving %s with %d batch slots", models.model_name, settings.max_sessions)
        try:
            yield
        finally:
            await service.shutdown()

    app = FastAPI(title="duplex", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(Guard, service=service)

    @app.websocket("/api/chat")
    async def chat(websocket: WebSocket) -> None:
        await Session(websocket, service).run()

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """Liveness: the model worker runs (it stays 200 while draining)."""
        healthy = service.scheduler.error is None and not service.stopping
        body = {"status": "ok" if healthy else "unavailable", "active_sessions": len(service.sessions)}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness for load balancers: 200 while a new session would start now, else 503."""
        capacity = service.capacity()
        status = "ready" if capacity["ready"] else ("draining" if capacity["draining"] else
                                                    "failed" if capacity["failed"] else "full")
        body = {"status": status, **{k: capacity[k] for k in ("slots", "active", "queued")}}
        return JSONResponse(body, status_code=200 if capacity["ready"] else 503)

    @app.get("/api/capacity")
    async def capacity() -> JSONResponse:
        return JSONResponse(service.capacity())

    @app.get("/api/info")
    async def info() -> JSONResponse:
        return JSONResponse(service.info())

    if settings.metrics_port is None:
        @app.get("/metrics")
        async def metrics() -> Response:
            return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    _mount_web_ui(app, web_dir or default_web_dir())
    return app


def _mount_web_ui(app: FastAPI, web_dir: Path) -> None:
    """Serve the static UI at / (index.html), or a short notice when its files are missing."""
    if (web_dir / "index.html").is_file():
        app.mount("/", StaticFiles(directory=str(web_dir), html=True), name="web")
        return
    logger.warning("web UI not found at %s; / serves a notice", web_dir)

    @app.get("/", response_class=HTMLResponse)
    async def no_ui() -> str:
        return _NO_UI


class GracefulServer(uvicorn.Server):
    """uvicorn server with duplex's transport bounds, a graceful drain on the first SIGTERM/SIGINT, and a
    shutdown that first ends the duplex sessions cleanly (kind-5 + drain) before uvicorn closes the sockets.

    First signal: stop admitting (``/readyz`` 503, queued clients told to reconnect elsewhere), let the
    active calls go on for up to ``shutdown_drain_seconds``, then end them with "server restarting" and
    exit 0. A second signal ends at once. ``should_exit = True`` (tests) stops without the drain.
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        self.duplex_service: DuplexService = app.state.service
        settings = self.duplex_service.settings
        limits = TransportLimits(max_message_bytes=settings.max_message_bytes,
                                 handshake_seconds=settings.handshake_seconds,
                                 fragment_seconds=settings.handshake_seconds)
        harden_config(config, limits, self.duplex_service.metrics.transport_closed)
        super().__init__(config)
        self._drain_deadline: float | None = None
        self._drain_requested = False

    def handle_exit(self, sig, frame) -> None:
        drain = self.duplex_service.settings.shutdown_drain_seconds
        if self._drain_requested or drain <= 0 or self.should_exit:
            self._captured_signals.append(sig)
            self.should_exit = True  # the second signal: end at once
            return
        self._captured_signals.append(sig)
        self._drain_requested = True  # the first: drain (started by on_tick, on the event loop)

    async def on_tick(self, counter: int) -> bool:
        should_exit = await super().on_tick(counter)
        if self._drain_requested and self._drain_deadline is None:
            self.duplex_service.begin_drain()
            self._drain_deadline = time.monotonic() + self.duplex_service.settings.shutdown_drain_seconds
        if self._drain_deadline is not None:
            service = self.duplex_service
            if not service.sessions and not service.admission.active:
                logger.info("drained: no call left")
                return True
            if time.monotonic() >= self._drain_deadline:
                logger.info("drain time over: ending %d calls", len(service.sessions))
                return True
        return should_exit

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                logger.info("duplex listening on %s port %d (web UI at /, websocket /api/chat)", host, port)
        self._start_metrics_server()

    def _start_metrics_server(self) -> None:
        port = self.duplex_service.settings.metrics_port
        if port is None:
            return
        from prometheus_client import start_http_server

        host = self.config.host if isinstance(self.config.host, str) else "127.0.0.1"
        self.metrics_http, _ = start_http_server(port, addr=host, registry=self.duplex_service.metrics.registry)
        logger.info("metrics at http://%s:%d/metrics", host, self.metrics_http.server_port)

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()  # stop accepting before telling the clients
        await self.duplex_service.shutdown()
        await super().shutdown(sockets=sockets)
        metrics_http = getattr(self, "metrics_http", None)
        if metrics_http is not None:
            metrics_http.shutdown()
            metrics_http.server_close()
        # uvicorn re-raises a captured SIGINT/SIGTERM once serving ends (exit by signal, or a
        # KeyboardInterrupt traceback); the shutdown was graceful, so `duplex serve` exits 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if captured:
            logger.info("stopped by signal %s after a graceful shutdown", ", ".join(str(s) for s in captured))
            captured.clear()
