"""The FastAPI application: websocket /api/chat, /healthz, /api/info, /metrics and the web UI at /.

``create_app(models, settings)`` builds the app; its lifespan starts the scheduler's worker
thread and, on exit, shuts the service down gracefully. :class:`GracefulServer` is a uvicorn
server that tells connected clients (kind 5) and drains their sessions *before* uvicorn closes
the sockets.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import uvicorn
from fastapi import FastAPI, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from duplex.server.metrics import CONTENT_TYPE
from duplex.server.service import DuplexService, ServerSettings
from duplex.server.session import Session

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

    app = FastAPI(title="duplex", lifespan=lifespan)
    app.state.service = service

    @app.websocket("/api/chat")
    async def chat(websocket: WebSocket) -> None:
        await Session(websocket, service).run()

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        healthy = service.scheduler.error is None and not service.shutting_down
        body = {"status": "ok" if healthy else "unavailable", "active_sessions": len(service.sessions)}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/api/info")
    async def info() -> JSONResponse:
        return JSONResponse(service.info())

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
    """uvicorn server whose shutdown first ends the duplex sessions cleanly (kind-5 + drain)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.duplex_service: DuplexService = app.state.service

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                logger.info("duplex listening on %s port %d (web UI at /, websocket /api/chat)", host, port)

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()  # stop accepting before telling the clients
        await self.duplex_service.shutdown()
        await super().shutdown(sockets=sockets)
        # uvicorn re-raises a captured SIGINT/SIGTERM once serving ends (exit by signal, or a
        # KeyboardInterrupt traceback); the shutdown was graceful, so `duplex serve` exits 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if captured:
            logger.info("stopped by signal %s after a graceful shutdown", ", ".join(str(s) for s in captured))
            captured.clear()
