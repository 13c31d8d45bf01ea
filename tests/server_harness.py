"""Test helpers for the server tests: tiny models, a live uvicorn server in a thread, clients."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from duplex.client.client import AudioEvent, DuplexClient, ErrorEvent, MetadataEvent, TextEvent
from duplex.client.bench_support import ServerThread
from duplex.server.service import ServerSettings

FRAME = 1920


def spawn_serve(*args: str, wait_s: float = 60.0) -> tuple[subprocess.Popen, int, list[str]]:
    """`python -m duplex.cli serve ARGS` on a free loopback port (give "--port", "0"): the process, the port it
    logged, and its log lines (read on, in a thread). Fails the test, with the log, when it does not start."""
    import pytest

    from duplex.server.bench_flood import start_serve

    try:
        return start_serve(*args, wait_s=wait_s)
    except RuntimeError as exc:
        pytest.fail(str(exc))


def load_tiny_models(fixtures_dir: Path, tokenizer_path: Path):
    """The tiny fixture models through the same loader `duplex serve` uses (greedy lm_gen_config)."""
    from duplex.bundle import load_models_from_paths

    return load_models_from_paths(
        fixtures_dir / "lm_tiny" / "model.safetensors",
        fixtures_dir / "mimi_tiny" / "model.safetensors",
        tokenizer_path,
        config=fixtures_dir / "lm_tiny" / "config.json",
        mimi_config=fixtures_dir / "mimi_tiny" / "config.json",
        model_name="tiny",
    )


class SlowFakeEngine:
    """Stands in for DuplexEngine: sleeps ``step_seconds`` per step, echoes the input at half volume,
    every ready slot has output (no first frame rule, no delay), text token 0 (never sent)."""

    def __init__(self, batch_size: int, step_seconds: float) -> None:
        self.batch_size = batch_size
        self.frame_size = FRAME
        self.step_seconds = step_seconds
        self.steps = 0

    def join(self, slot: int, sampling=None) -> None:
        pass

    def leave(self, slot: int) -> None:
        pass

    def move_slot(self, src: int, dst: int) -> None:
        pass

    def step(self, pcm: np.ndarray, ready: np.ndarray | None = None):
        from duplex.server.engine import StepOutput, StepTimings

        time.sleep(self.step_seconds)
        self.steps += 1
        b = self.batch_size
        has_output = np.ones(b, dtype=bool) if ready is None else np.asarray(ready, dtype=bool).copy()
        return StepOutput(pcm=0.5 * pcm, tokens=np.zeros((b, 9), dtype=np.int64),
                          has_output=has_output, timings=StepTimings(lm=self.step_seconds))


def reference_server_run(models, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference server's algorithm (one conversation, greedy), composed from fixture-verified parts.

    User codes: frame 0 encoded and discarded, then Mimi ``encode_step`` on a fresh encoder state
    from frame 1 on; a greedy LMGen stepped on every frame (frame 0 included: offset 0 reads only
    initial tokens); Mimi decode of the valid steps. ``audio`` [N * 1920] -> tokens [9, N - 1], pcm.
    """
    import torch

    from duplex.model.generate import LMGen

    frames = torch.from_numpy(audio).reshape(-1, 1, 1, FRAME)  # [N, 1, 1, 1920]
    user_books = models.lm.config.n_q - models.lm.config.dep_q
    lm_gen = LMGen(models.lm, use_sampling=False)
    with torch.inference_mode():
        lm_state = lm_gen.init_state(1)
        discarded = models.mimi.encode_step(frames[0], models.mimi.init_state(1))[:, :user_books]  # [1, 8, 1]
        encoder = models.mimi.init_state(1)
        decoder = models.mimi.init_state(1)
        tokens, pcm = [], []
        for index in range(frames.shape[0]):
            codes = discarded if index == 0 else models.mimi.encode_step(frames[index], encoder)[:, :user_books]
            step_tokens, valid = lm_gen.step(codes, lm_state)  # [1, 9, 1], [1]
            if bool(valid[0]):
                tokens.append(step_tokens[0, :, 0].numpy().copy())
                pcm.append(models.mimi.decode_step(step_tokens[:, 1:], decoder)[0, 0].numpy().copy())
    return np.stack(tokens, axis=1), np.concatenate(pcm)


def free_port() -> int:
    """A loopback port that nothing listens on (for "connection refused" tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def LiveServer(models, settings: ServerSettings, engine=None, uvicorn_options=None) -> ServerThread:  # noqa: N802
    """``create_app(models, settings)`` served on a socket bound up front (no port race); call ``start()``."""
    return ServerThread(models, settings, engine=engine, uvicorn_options=uvicorn_options)


@contextlib.contextmanager
def live_server(models, engine=None, uvicorn_options=None, **settings):
    server = LiveServer(models, ServerSettings(**settings), engine=engine, uvicorn_options=uvicorn_options).start()
    try:
        yield server
    finally:
        server.stop()


def synth_audio(frames: int, seed: int) -> np.ndarray:
    """Deterministic speech-like noise: [frames * 1920] float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames * FRAME) / 24000.0
    tone = 0.3 * np.sin(2 * np.pi * (180 + 40 * seed) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (tone + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


class Transcript:
    """What one client received."""

    def __init__(self) -> None:
        self.audio: list[np.ndarray] = []
        self.text: list[str] = []
        self.tokens: list[list[int]] = []
        self.metadata: list[dict] = []
        self.errors: list[str] = []


def jittered_schedule(frames: int, jitter: float, seed: int) -> list[float]:
    """Send offsets (s) of a real-time client whose frames are each delayed by up to ``jitter``, order
    kept (as over TCP on Wi-Fi or mobile networks)."""
    rng, times, latest = np.random.default_rng(seed), [], 0.0
    for i in range(frames):
        latest = max(latest, i * 0.08 + float(rng.uniform(0.0, jitter)))
        times.append(latest)
    return times


async def converse(url: str, pcm: np.ndarray, params=None, realtime: bool = False,
                   timeout: float = 60.0, ready: asyncio.Barrier | None = None,
                   schedule: list[float] | None = None) -> Transcript:
    """Stream ``pcm`` (then close) and collect every output frame of a token-exposing server.

    With N input frames the tiny LM's acoustic delay of one step (the first frame's step, whose
    codes have no effect) leaves N - 1 output frames; the client closes once it has them all.
    With ``ready``, every client of the barrier is connected before any of them sends. ``schedule``:
    the send time of each frame (seconds after the start), e.g. from :func:`jittered_schedule`.
    """
    client = await DuplexClient.connect(url, params=params, timeout=timeout)
    if ready is not None:  # start sending together with the other clients of the barrier
        await asyncio.wait_for(ready.wait(), timeout)
    expected = pcm.size // FRAME - 1
    result = Transcript()

    async def send() -> None:
        start = time.monotonic()
        for i in range(pcm.size // FRAME):
            if schedule is not None:
                await asyncio.sleep(max(0.0, start + schedule[i] - time.monotonic()))
            await client.send_pcm(pcm[i * FRAME:(i + 1) * FRAME])
            await asyncio.sleep(0.08 if realtime else 0)

    sender = asyncio.ensure_future(send())
    try:
        await asyncio.wait_for(_collect(client, result, expected), timeout)
    finally:
        sender.cancel()
        await client.close()
    return result


async def _collect(client: DuplexClient, result: Transcript, expected: int) -> None:
    async for event in client:
        if isinstance(event, AudioEvent):
            result.audio.append(event.pcm)
        elif isinstance(event, TextEvent):
            result.text.append(event.text)
        elif isinstance(event, MetadataEvent):
            if event.data.get("type") == "tokens":
                result.tokens.append(event.data["tokens"])
                if len(result.tokens) >= expected:
                    return
            else:
                result.metadata.append(event.data)
        elif isinstance(event, ErrorEvent):
            result.errors.append(event.message)
