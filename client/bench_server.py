"""``duplex bench server``: one real-time client over loopback, per-frame latency and lost frames.

By default a server with the tiny fixture models is started in this process (uvicorn in a thread,
the same app as ``duplex serve``); ``--url`` measures a running server instead, and the model flags
(``--hf-repo``, ``--moshi-weight``, ...) bench real models in-process. The client streams audio in
real time (one 80 ms frame every 80 ms) for ``--seconds`` and the benchmark prints:

- per-frame latency, median and p99: on the server, from the user frame's arrival to the send of
  the model audio of that step (``duplex_frame_latency_seconds`` when the server exports it), and
  the client's round trip (frame sent -> its model frame decoded; adds Opus and loopback);
- frames lost: model frames missing from what the client received, plus frames the server
  stepped with silence (late) or dropped; must be 0;
- CPU use of this process and of the whole machine, and the server's batched step latency.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from duplex.client.audio import FRAME_SIZE, SAMPLE_RATE, read_audio
from duplex.client.bench_support import (
    RunRecord,
    ServerThread,
    fetch_metrics,
    histogram_summary,
    latency_summary,
    metric_value,
    tiny_model_args,
)
from duplex.bundle_args import ModelSourceError, add_model_arguments, load_models

logger = logging.getLogger(__name__)

FRAME_SECONDS = FRAME_SIZE / SAMPLE_RATE
MODEL_FLAGS = ("moshi_weight", "mimi_weight", "tokenizer", "config", "mimi_config", "hf_repo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``duplex bench server``."""
    parser.description = ("One client streams in real time over loopback; prints per-frame latency, lost frames "
                          "and CPU use. Without model flags a server with the tiny fixture models runs in this "
                          "process; with --hf-repo/--moshi-weight/... it runs those models; --url measures a "
                          "running server.")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the client streams (default 30)")
    parser.add_argument("--url", help="bench a running server at this ws:// URL instead of starting one")
    parser.add_argument("--input", type=Path,
                        help="audio to stream, looped as needed (default: synthetic speech-like noise)")
    parser.add_argument("--fixtures", type=Path,
                        help="folder of the tiny fixture models (default: DUPLEX_FIXTURES or ../shared/fixtures)")
    parser.add_argument("--max-sessions", type=int, default=1,
                        help="batch slots of the in-process server (default 1)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads of the in-process server (default: 1 for the tiny models, "
                        "else torch's default)")
    add_model_arguments(parser)
    parser.set_defaults(hf_repo=None)  # no model flag = the tiny fixture models


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print its table; errors are one line on stderr."""
    try:
        audio = stream_audio(args.input, args.seconds)
        if args.url:
            record = asyncio.run(measure(args.url, audio, lag_frames=1))
            server_latencies = None
        else:
            record, server_latencies = run_in_process(args, audio)
    except (ModelSourceError, ValueError, OSError) as exc:
        print(f"duplex bench server: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - e.g. the client's ServerError, shown as one line
        print(f"duplex bench server: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print_report(record, server_latencies, in_process=not args.url)
    if record.server_error:
        print(f"duplex bench server: the server ended the session: {record.server_error}", file=sys.stderr)
    return 0 if record.frames_lost == 0 and not record.server_error else 2


def stream_audio(path: Path | None, seconds: float) -> np.ndarray:
    """``seconds`` of mono 24 kHz audio: the file looped, or synthetic speech-like noise."""
    if seconds <= 0:
        raise ValueError(f"--seconds must be positive, got {seconds}")
    total = int(round(seconds / FRAME_SECONDS)) * FRAME_SIZE
    if path is not None:
        source = read_audio(path)
        return np.resize(source, total).astype(np.float32)
    rng = np.random.default_rng(0)
    t = np.arange(total) / SAMPLE_RATE
    voice = 0.3 * np.sin(2 * np.pi * 200 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (voice + 0.05 * rng.standard_normal(total)).astype(np.float32)


def run_in_process(args: argparse.Namespace, audio: np.ndarray) -> tuple[RunRecord, list[float] | None]:
    """Start the server in a thread, stream to it, stop it; returns the record and server latencies."""
    from duplex.server.service import ServerSettings

    with tempfile.TemporaryDirectory() as scratch:
        tiny = not any(getattr(args, flag, None) for flag in MODEL_FLAGS)
        if tiny:
            args = tiny_model_args(args, Path(scratch))
        elif args.hf_repo is None:
            from duplex.bundle_args import DEFAULT_HF_REPO

            args.hf_repo = DEFAULT_HF_REPO
        models = load_models(args)
        lag = max(models.lm.config.delays)
        settings = ServerSettings(max_sessions=args.max_sessions, max_queue=0,
                                  torch_threads=args.threads or (1 if tiny else None))
        with ServerThread(models, settings) as server:
            record = asyncio.run(measure(server.url, audio, lag_frames=lag))
            metrics = server.service.metrics
            recent = getattr(metrics, "recent_frame_latencies", None)
            latencies = list(recent) if recent is not None else None
    return record, latencies


async def measure(url: str, audio: np.ndarray, lag_frames: int) -> RunRecord:
    """Stream ``audio`` in real time and time every model frame; server metrics before and after."""
    from duplex.client.client import AudioEvent, DuplexClient, ErrorEvent

    http = url.replace("ws://", "http://").replace("wss://", "https://").split("/api/")[0]
    before = await fetch_metrics(http)
    record = RunRecord(lag_frames=lag_frames)
    client = await DuplexClient.connect(url, params={"text_seed": 1, "audio_seed": 1}, timeout=30)
    process = psutil.Process()
    psutil.cpu_percent(None)
    cpu_before, wall_before = process.cpu_times(), time.perf_counter()

    async def receive() -> None:
        pending = 0
        async for event in client:
            if isinstance(event, AudioEvent):
                pending += event.pcm.size
                while pending >= FRAME_SIZE:
                    record.recv_times.append(time.perf_counter())
                    pending -= FRAME_SIZE
            elif isinstance(event, ErrorEvent):
                record.server_error = event.message

    receiver = asyncio.ensure_future(receive())
    try:
        await _send_in_real_time(client, audio, record)
        await _wait_for_tail(record, receiver)
    finally:
        record.wall_s = time.perf_counter() - wall_before
        cpu_after = process.cpu_times()
        record.process_cpu_s = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
        record.machine_cpu_percent = psutil.cpu_percent(None)
        await client.close()
        receiver.cancel()
        await asyncio.gather(receiver, return_exceptions=True)
    await asyncio.sleep(0.2)  # let the server count the session's end
    record.server_delta = _metrics_delta(before, await fetch_metrics(http))
    return record


async def _send_in_real_time(client, audio: np.ndarray, record: RunRecord) -> None:
    """One frame every 80 ms on an absolute clock, until the audio ends or the server hangs up."""
    import websockets

    start = time.perf_counter()
    for index in range(audio.size // FRAME_SIZE):
        delay = start + index * FRAME_SECONDS - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record.send_times.append(time.perf_counter())
        try:
            await client.send_pcm(audio[index * FRAME_SIZE : (index + 1) * FRAME_SIZE])
        except websockets.ConnectionClosed:
            record.server_error = record.server_error or "the server closed the connection"
            return


async def _wait_for_tail(record: RunRecord, receiver: asyncio.Future, quiet: float = 1.0) -> None:
    """Wait for the last model frames: all expected arrived, or nothing for ``quiet`` seconds."""
    while not receiver.done() and len(record.recv_times) < record.frames_expected:
        last = record.recv_times[-1] if record.recv_times else record.send_times[-1]
        remaining = last + quiet - time.perf_counter()
        if remaining <= 0:
            return
        await asyncio.wait({receiver}, timeout=min(remaining, 0.05))


def _metrics_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}


def print_report(record: RunRecord, server_latencies: list[float] | None, in_process: bool) -> None:
    """The benchmark table (plain text on stdout)."""
    delta = record.server_delta
    rows = [("frames sent", f"{len(record.send_times)}"),
            ("model frames received", f"{len(record.recv_times)} (expected {record.frames_expected})")]
    from_buckets = histogram_summary(delta, "duplex_frame_latency_seconds")
    if server_latencies:
        summary = latency_summary(server_latencies)
    else:
        summary = from_buckets or "not exported by this server"
    rows.append(("server latency (frame in -> audio sent)", summary))
    rows.append(("client round trip (sent -> decoded)", latency_summary(record.round_trips())))
    steps = metric_value(delta, "duplex_step_seconds_count", stage="total")
    if steps:
        mean_step = metric_value(delta, "duplex_step_seconds_sum", stage="total") / steps
        rows.append(("server batched step (mean)", f"{mean_step * 1e3:.2f} ms over {int(steps)} ticks"))
    rows.append(("frames lost (must be 0)", f"{record.frames_lost}: {record.frames_missing} missing, "
                 f"{record.frames_late} late (stepped as silence), {record.frames_dropped} dropped"))
    who = "this process (server + client)" if in_process else "this process (client only)"
    cores = psutil.cpu_count() or 1
    rows.append((f"CPU, {who}", f"{100 * record.process_cpu_s / record.wall_s:.1f}% of one core"))
    rows.append(("CPU, whole machine", f"{record.machine_cpu_percent:.1f}% of {cores} cores"))
    width = max(len(name) for name, _ in rows)
    print(f"duplex bench server: one real-time client, {len(record.send_times) * FRAME_SECONDS:.1f} s")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
