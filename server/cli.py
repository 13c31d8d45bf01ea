"""`duplex serve`: load the models once and serve the websocket API and the web UI."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from duplex.server.service import ServerSettings

logger = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error")


def bounded(kind: type, low: float, high: float, name: str = "value"):
    """An argparse type: a finite ``kind`` in [low, high] (nan, inf and out-of-range values are refused)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range [{low:g}, {high:g}]")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def default_threads() -> int:
    """Intra-op threads of the model worker: all cores but one (left to the event loop), at least 1."""
    return max(1, (os.cpu_count() or 1) - 1)


DAY = 86400.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve flags plus the model-source flags of :mod:`duplex.bundle_args`."""
    from duplex.bundle_args import add_model_arguments

    defaults = ServerSettings()
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="localhost", help="interface to listen on (default: localhost; "
                     "0.0.0.0 for every interface)")
    net.add_argument("--port", type=bounded(int, 0, 65535), default=8998, help="TCP port (default: 8998; "
                     "0 = any free port, logged at start)")
    net.add_argument("--ssl", metavar="DIR", help="serve https/wss with DIR/cert.pem and DIR/key.pem")
    net.add_argument("--metrics-port", type=bounded(int, 1, 65535), default=None,
                     help="serve /metrics on this port instead (no API key needed there; keep it private)")
    access = parser.add_argument_group("access control")
    access.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="require this API key (repeatable; also DUPLEX_API_KEYS, comma-separated): "
                        "clients send 'Authorization: Bearer KEY' or ?api_key=KEY; without a key the "
                        "websocket, /api/info, /api/capacity and /metrics answer 401")
    access.add_argument("--allowed-origins", default=None, metavar="ORIGINS",
                        help="comma-separated browser origins allowed to open a session, e.g. "
                        "https://app.example.com ('*' = any; default: the server's own host and localhost); "
                        "others get 403 before any session")
    limits = parser.add_argument_group("limits per client address and connection")
    limits.add_argument("--max-client-connections", type=bounded(int, 0, 1_000_000),
                        default=defaults.max_client_connections,
                        help="open /api/chat connections (sessions and queued) per client address; beyond: 429 "
                        f"(default: {defaults.max_client_connections}; 0 = no limit)")
    limits.add_argument("--client-connections-per-minute", type=bounded(float, 0, 1e9),
                        default=defaults.client_connections_per_minute,
                        help="new /api/chat connections per client address and minute, beyond: 429 "
                        f"(default: {defaults.client_connections_per_minute:g}; 0 = no limit)")
    limits.add_argument("--handshake-seconds", type=bounded(float, 0.1, 3600), default=defaults.handshake_seconds,
                        help="time allowed for a request head, a websocket upgrade, or one fragmented message "
                        f"(default: {defaults.handshake_seconds:g})")
    limits.add_argument("--first-audio-seconds", type=bounded(float, 0, DAY), default=defaults.first_audio_seconds,
                        help="a session whose client sends no audio this long after the handshake ends with an "
                        f"error, freeing its slot (default: {defaults.first_audio_seconds:g}; 0 = no deadline)")
    serving = parser.add_argument_group("sessions")
    serving.add_argument("--max-sessions", type=bounded(int, 1, 4096), default=defaults.max_sessions,
                         help="conversations served at once = batch size of the model step "
                         f"(default: {defaults.max_sessions})")
    serving.add_argument("--min-step-rows", type=bounded(int, 1, 4096), default=None, metavar="N",
                         help="the fewest rows a batched model step computes (default: 4 with more than one "
                         "session, which makes every answer bit-identical whoever its neighbours are; 1 = "
                         "cheapest for one or two sessions on a CPU, where answers may then differ in the last "
                         "bits with the number of sessions)")
    serving.add_argument("--max-queue", type=bounded(int, 0, 100_000), default=defaults.max_queue,
                         help="clients that may wait for a free slot; beyond, a new client gets a "
                         f"'busy' error (default: {defaults.max_queue}; 0 = no queue)")
    serving.add_argument("--max-session-seconds", type=bounded(float, 0, 30 * DAY), default=0.0,
                         help="end each conversation after this many seconds, announced to the client "
                         "(default: 0 = no limit)")
    serving.add_argument("--max-lag-ms", type=bounded(float, 0, 3_600_000), default=defaults.max_lag_ms,
                         help="while a session runs this far behind real time (the machine cannot keep up), "
                         "new clients wait in the queue (default: %(default)g; 0 = always admit)")
    serving.add_argument("--hard-lag-ms", type=bounded(float, 0, 3_600_000), default=defaults.hard_lag_ms,
                         help="a session this far behind real time ends with a kind-5 'server overloaded' "
                         "error (default: %(default)g; 0 = never)")
    serving.add_argument("--grace-ms", type=bounded(float, 0, 1000), default=None,
                         help="deprecated, no effect: the scheduler no longer waits for late audio or steps "
                         "silence in its place (a slot without a frame simply does not step)")
    serving.add_argument("--drain-seconds", type=bounded(float, 0, DAY), default=defaults.shutdown_drain_seconds,
                         help="on SIGTERM/SIGINT: stop admitting and let active calls go on this long, then end "
                         "them with 'server restarting' and exit 0; a second signal ends at once "
                         f"(default: {defaults.shutdown_drain_seconds:g}; 0 = end at once)")
    serving.add_argument("--threads", type=bounded(int, 1, 1024), default=None,
                         help="torch intra-op threads of the model worker (default: the number of cores minus "
                         f"one, leaving one to the event loop: {default_threads()} here)")
    serving.add_argument("--instance-name", default=None,
                         help="name reported to clients in the session metadata (default: the host name)")
    serving.add_argument("--web-dir", type=Path, default=None,
                         help="folder of the web UI served at / (default: the package's client/web)")
    serving.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                         help="load the models and run the model steps in a child process, so that the event "
                         "loop (sockets, Opus) and the model do not share one interpreter lock: a busy loop then "
                         "cannot slow the steps (default: on; --no-engine-process runs them in a thread)")
    serving.add_argument("--demo", action="store_true",
                         help="serve tiny random models built in memory instead of real ones (no files, no "
                         "download; the model speaks noise): try the page and the API anywhere")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="logging level (default: info)")
    add_model_arguments(parser)


def api_keys_from(args: argparse.Namespace, environ=os.environ) -> tuple[str, ...]:
    """--api-key values plus DUPLEX_API_KEYS (comma-separated); ValueError for an empty key."""
    keys = list(getattr(args, "api_key", None) or [])
    keys += [k.strip() for k in environ.get("DUPLEX_API_KEYS", "").split(",") if k.strip()]
    for key in keys:
        if not key.strip():
            raise ValueError("--api-key must not be empty")
        if len(key) < 8:
            raise ValueError("an API key must have at least 8 characters")
    return tuple(keys)


def settings_from_args(args: argparse.Namespace, environ=os.environ) -> ServerSettings:
    """Validate the flags into ServerSettings (ValueError with the bad flag)."""
    for flag in ("max_sessions", "max_queue", "max_session_seconds", "max_lag_ms", "hard_lag_ms", "port"):
        value = getattr(args, flag)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{flag.replace('_', '-')} must be a finite number, got {value}")
    if args.max_sessions < 1:
        raise ValueError(f"--max-sessions must be >= 1, got {args.max_sessions}")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_session_seconds < 0:
        raise ValueError(f"--max-session-seconds must be >= 0, got {args.max_session_seconds}")
    for flag, value in (("--max-lag-ms", args.max_lag_ms), ("--hard-lag-ms", args.hard_lag_ms)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{flag} must be a finite number >= 0, got {value}")
    if args.grace_ms is not None:
        logger.warning("--grace-ms is deprecated and has no effect (late audio is never replaced by silence)")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535 (0 = any free port), got {args.port}")
    origins = tuple(o.strip() for o in (getattr(args, "allowed_origins", None) or "").split(",") if o.strip())
    extra = {"instance_name": args.instance_name} if getattr(args, "instance_name", None) else {}
    defaults = ServerSettings()
    return ServerSettings(
        max_sessions=args.max_sessions, min_step_rows=getattr(args, "min_step_rows", None),
        max_queue=args.max_queue, max_session_seconds=args.max_session_seconds,
        max_lag_ms=args.max_lag_ms, hard_lag_ms=args.hard_lag_ms, torch_threads=getattr(args, "threads", None) or default_threads(),
        api_keys=api_keys_from(args, environ), allowed_origins=origins,
        max_client_connections=getattr(args, "max_client_connections", defaults.max_client_connections),
        client_connections_per_minute=getattr(args, "client_connections_per_minute",
                                              defaults.client_connections_per_minute),
        handshake_seconds=getattr(args, "handshake_seconds", defaults.handshake_seconds),
        first_audio_seconds=getattr(args, "first_audio_seconds", defaults.first_audio_seconds),
        shutdown_drain_seconds=getattr(args, "drain_seconds", defaults.shutdown_drain_seconds),
        metrics_port=getattr(args, "metrics_port", None), demo=bool(getattr(args, "demo", False)), **extra,
    )


def ssl_files(directory: str | None) -> tuple[str | None, str | None]:
    """(cert.pem, key.pem) inside ``directory``; ValueError when one is missing."""
    if not directory:
        return None, None
    cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    missing = [str(p) for p in (cert, key) if not p.is_file()]
    if missing:
        raise ValueError(f"--ssl {directory}: missing {', '.join(missing)} (expected cert.pem and key.pem)")
    return str(cert), str(key)


def load_for_serving(args: argparse.Namespace, settings: ServerSettings):
    """(models, engine): with --engine-process a ProcessEngine and the RemoteModels it reports, else the models
    and a DuplexEngine built here (driven by the scheduler's thread)."""
    from duplex.server.engine_process import EngineSpec, ProcessEngine, build_engine

    spec = EngineSpec(batch_size=settings.max_sessions, model_args=EngineSpec.model_flags(args), demo=settings.demo,
                      min_rows=settings.min_step_rows, torch_threads=settings.torch_threads, log_level=args.log_level)
    if getattr(args, "engine_process", False):
        engine = ProcessEngine(spec)
        return engine.models, engine
    return build_engine(spec)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from duplex.server.app import GracefulServer, create_app
    from duplex.bundle_args import ModelSourceError
    from duplex.server.engine_process import EngineProcessDied, EngineStartError

    logging.getLogger().setLevel(args.log_level.upper())
    try:
        settings = settings_from_args(args)
        certfile, keyfile = ssl_files(args.ssl)
    except ValueError as exc:
        print(f"duplex serve: {exc}", file=sys.stderr)
        return 2
    try:
        models, engine = load_for_serving(args, settings)
    except (ModelSourceError, EngineStartError, EngineProcessDied) as exc:
        print(f"duplex serve: {exc}", file=sys.stderr)
        return 1
    app = create_app(models, settings, engine=engine, web_dir=args.web_dir)
    config = uvicorn.Config(app, host=args.host, port=args.port, ssl_certfile=certfile, ssl_keyfile=keyfile,
                            log_level=args.log_level, ws="websockets-sansio", lifespan="on")
    if args.port:
        scheme = "https" if certfile else "http"
        logger.info("web UI at %s://%s:%d/  (websocket /api/chat)", scheme, args.host, args.port)
    GracefulServer(config, app).run()
    return 0
