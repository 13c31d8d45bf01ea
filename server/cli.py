"""`duplex serve`: load the models once and serve the websocket API and the web UI."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from duplex.server.service import ServerSettings

logger = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve flags plus the model-source flags of :mod:`duplex.bundle_args`."""
    from duplex.bundle_args import add_model_arguments

    defaults = ServerSettings()
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="localhost", help="interface to listen on (default: localhost; "
                     "0.0.0.0 for every interface)")
    net.add_argument("--port", type=int, default=8998, help="TCP port (default: 8998; 0 = any free port, "
                     "logged at start)")
    net.add_argument("--ssl", metavar="DIR", help="serve https/wss with DIR/cert.pem and DIR/key.pem")
    serving = parser.add_argument_group("sessions")
    serving.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                         help="conversations served at once = batch size of the model step "
                         f"(default: {defaults.max_sessions})")
    serving.add_argument("--max-queue", type=int, default=defaults.max_queue,
                         help="clients that may wait for a free slot; beyond, a new client gets a "
                         f"'busy' error (default: {defaults.max_queue}; 0 = no queue)")
    serving.add_argument("--max-session-seconds", type=float, default=0.0,
                         help="end each conversation after this many seconds, announced to the client "
                         "(default: 0 = no limit)")
    serving.add_argument("--grace-ms", type=float, default=defaults.grace_ms,
                         help="how long a tick waits for a session whose frame is late before stepping "
                         f"it with silence (default: {defaults.grace_ms:g})")
    serving.add_argument("--threads", type=int, default=None,
                         help="torch intra-op threads of the model worker (default: torch's choice)")
    serving.add_argument("--web-dir", type=Path, default=None,
                         help="folder of the web UI served at / (default: the package's client/web)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="logging level (default: info)")
    add_model_arguments(parser)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Validate the flags into ServerSettings (ValueError with the bad flag)."""
    if args.max_sessions < 1:
        raise ValueError(f"--max-sessions must be >= 1, got {args.max_sessions}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_session_seconds < 0:
        raise ValueError(f"--max-session-seconds must be >= 0, got {args.max_session_seconds}")
    if args.grace_ms < 0:
        raise ValueError(f"--grace-ms must be >= 0, got {args.grace_ms}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535 (0 = any free port), got {args.port}")
    return ServerSettings(max_sessions=args.max_sessions, max_queue=args.max_queue,
                          max_session_seconds=args.max_session_seconds, grace_ms=args.grace_ms,
                          torch_threads=args.threads)


def ssl_files(directory: str | None) -> tuple[str | None, str | None]:
    """(cert.pem, key.pem) inside ``directory``; ValueError when one is missing."""
    if not directory:
        return None, None
    cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    missing = [str(p) for p in (cert, key) if not p.is_file()]
    if missing:
        raise ValueError(f"--ssl {directory}: missing {', '.join(missing)} (expected cert.pem and key.pem)")
    return str(cert), str(key)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from duplex.server.app import GracefulServer, create_app
    from duplex.bundle_args import ModelSourceError, load_models

    logging.getLogger().setLevel(args.log_level.upper())
    try:
        settings = settings_from_args(args)
        certfile, keyfile = ssl_files(args.ssl)
    except ValueError as exc:
        print(f"duplex serve: {exc}", file=sys.stderr)
        return 2
    try:
        models = load_models(args)
    except ModelSourceError as exc:
        print(f"duplex serve: {exc}", file=sys.stderr)
        return 1
    app = create_app(models, settings, web_dir=args.web_dir)
    config = uvicorn.Config(app, host=args.host, port=args.port, ssl_certfile=certfile, ssl_keyfile=keyfile,
                            log_level=args.log_level, ws="websockets-sansio", lifespan="on")
    if args.port:
        scheme = "https" if certfile else "http"
        logger.info("web UI at %s://%s:%d/  (websocket /api/chat)", scheme, args.host, args.port)
    GracefulServer(config, app).run()
    return 0
