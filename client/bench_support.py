"""Helpers of ``duplex bench server``: the in-process server thread, the tiny models, metrics."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunRecord:
    """Timestamps (time.perf_counter) and counters of one benchmark run."""

    lag_frames: int  # input frames without output: the acoustic delay (max(delays), 1 for Moshi)
    send_times: list[float] = field(default_factory=list)  # per input frame
    recv_times: list[float] = field(default_factory=list)  # per model frame decoded
    wall_s: float = 0.0
    process_cpu_s: float = 0.0
    machine_cpu_percent: float = 0.0
    server_delta: dict[str, float] = field(default_factory=dict)  # /metrics after - before
    server_error: str | None = None  # a kind-5 message, or why the connection ended early

    @property
    def frames_expected(self) -> int:
        return max(len(self.send_times) - self.lag_frames, 0)

    @property
    def frames_missing(self) -> int:
        return max(self.frames_expected - len(self.recv_times), 0)

    @property
    def frames_late(self) -> int:
        return int(metric_value(self.server_delta, "duplex_frames_late_total"))

    @property
    def frames_dropped(self) -> int:
        return int(sum(metric_value(self.server_delta, "duplex_frames_dropped_total", direction=d)
                       for d in ("in", "out")))

    @property
    def frames_lost(self) -> int:
        """Model frames the client never got plus frames the server replaced by silence or dropped."""
        return self.frames_missing + self.frames_late + self.frames_dropped

    def round_trips(self) -> list[float]:
        """Seconds from sending input frame n to decoding model frame n - lag (its answer)."""
        sent = self.send_times[self.lag_frames :]
        return [received - sent_at for sent_at, received in zip(sent, self.recv_times)]


def latency_summary(seconds: list[float]) -> str:
    """'median X ms, p99 Y ms (n = N)'."""
    if not seconds:
        return "no samples"
    values = np.asarray(seconds) * 1e3
    return (f"median {np.median(values):.2f} ms, p99 {np.percentile(values, 99):.2f} ms, "
            f"max {values.max():.2f} ms (n = {values.size})")


def metric_value(metrics: dict[str, float], name: str, **labels: str) -> float:
    """One sample of a parsed /metrics dict (keys ``name{label="v",...}`` as in fetch_metrics)."""
    if labels:
        name += "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return metrics.get(name, 0.0)


def histogram_summary(metrics: dict[str, float], name: str) -> str | None:
    """'mean X ms, median <= Y ms, p99 <= Z ms' from a Prometheus histogram's buckets (None if empty)."""
    count = metric_value(metrics, f"{name}_count")
    if count <= 0:
        return None
    prefix = f'{name}_bucket{{le="'
    buckets = sorted((float(key[len(prefix):-2]), value) for key, value in metrics.items() if key.startswith(prefix))

    def bound(q: float) -> str:
        for upper, cumulative in buckets:
            if cumulative >= q * count:
                return f"{upper * 1e3:.1f} ms" if upper != float("inf") else "inf"
        return "inf"

    mean = metric_value(metrics, f"{name}_sum") / count
    return f"mean {mean * 1e3:.2f} ms, median <= {bound(0.5)}, p99 <= {bound(0.99)} (buckets, n = {int(count)})"


async def fetch_metrics(http_base: str) -> dict[str, float]:
    """GET /metrics as {``name{labels}``: value}; {} when the server has no such endpoint."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{http_base}/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response:
                if response.status != 200:
                    return {}
                text = await response.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return {}
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if sample.labels:
                key += "{" + ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items())) + "}"
            values[key] = float(sample.value)
    return values


class ServerThread:
    """``duplex serve``'s app on loopback, served by uvicorn in a background thread.

    The listening socket is bound here (port 0 = a free port chosen by the OS) and handed to
    uvicorn, so no other process can take the port between choosing and binding it.
    Use as a context manager, or ``start()`` / ``stop()``. ``app`` overrides the app built from
    ``models`` and ``settings`` (``engine`` replaces the batched engine, for tests); ``uvicorn_options``
    are extra ``uvicorn.Config`` arguments (e.g. a short ``ws_ping_interval`` in tests).
    """

    def __init__(self, models=None, settings=None, engine=None, app=None, uvicorn_options: dict | None = None) -> None:
        import uvicorn

        from duplex.server.app import GracefulServer, create_app

        self.app = app if app is not None else create_app(models, settings, engine=engine)
        self.service = self.app.state.service
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", ws="websockets-sansio", lifespan="on",
                                **(uvicorn_options or {}))
        self.server = GracefulServer(config, self.app)
        for name, value in (uvicorn_options or {}).items():  # over the server's own transport settings
            setattr(config, name, value)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="duplex-server", daemon=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/chat"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "ServerThread":
        """Start serving; returns once uvicorn accepts connections (OSError if it does not start)."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise OSError("the in-process server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Graceful shutdown (clients told, sessions drained), then close the socket."""
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def fixtures_dir(given: Path | None) -> Path:
    """The tiny fixture models' folder: --fixtures, DUPLEX_FIXTURES, or ../shared/fixtures."""
    folder = given or Path(os.environ.get("DUPLEX_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))
    if not (folder / "lm_tiny" / "model.safetensors").is_file():
        raise ValueError(f"tiny fixture models not found in {folder} (use --fixtures DIR or model flags)")
    return folder


def tiny_model_args(args: argparse.Namespace, scratch: Path) -> argparse.Namespace:
    """``args`` with the model flags pointing at the tiny fixtures and a freshly trained tokenizer."""
    folder = fixtures_dir(args.fixtures)
    tiny = argparse.Namespace(**vars(args))
    tiny.moshi_weight = str(folder / "lm_tiny" / "model.safetensors")
    tiny.config = str(folder / "lm_tiny" / "config.json")
    tiny.mimi_weight = str(folder / "mimi_tiny" / "model.safetensors")
    tiny.mimi_config = str(folder / "mimi_tiny" / "config.json")
    tiny.tokenizer = str(train_tiny_tokenizer(scratch))
    tiny.device = args.device or "cpu"
    return tiny


def train_tiny_tokenizer(folder: Path, vocab_size: int = 100) -> Path:
    """A small word-level sentencepiece model (ids 0 = unk, 3 = pad) for the tiny LM's text stream."""
    import sentencepiece

    words = [f"word{i}" for i in range(2 * vocab_size)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) + "\n")
    prefix = folder / "tiny_spm"
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="word",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
    )
    return prefix.with_suffix(".model")
