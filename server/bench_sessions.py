"""Per-session part of `duplex bench serve`: jittered real-time clients, solo answers, the session table."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from duplex.server import protocol

FRAME = protocol.FRAME_SIZE
FRAME_SECONDS = 0.08


@dataclass
class ClientRun:
    """What one benchmark client saw."""

    index: int
    jitter_ms: float
    session_id: str = ""
    send_times: list = field(default_factory=list)  # perf_counter per input frame
    recv_times: list = field(default_factory=list)  # perf_counter per answer (token message)
    text: list = field(default_factory=list)  # text token id per answer
    error: str = ""


@dataclass
class SessionResult:
    client: ClientRun
    equal_pct: float  # text tokens equal to the solo run, % of the solo run's
    silence: int  # frames stepped as silence for it (server record)
    dropped: int  # user frames sent and never stepped (sent - stepped)
    p50_ms: float
    p99_ms: float


def session_audio(audio: np.ndarray, index: int) -> np.ndarray:
    """Session ``index``'s input: the bench audio rotated by a prime number of frames per session."""
    return np.roll(audio, index * 7 * FRAME)


def jitter_of(index: int, jitter_ms: float) -> float:
    """Odd-numbered sessions get the jitter; even ones stay on time (the neighbours that must not slow)."""
    return jitter_ms if index % 2 else 0.0


def through_opus(pcm: np.ndarray) -> list[np.ndarray]:
    """The frames the server decodes from a client that sends ``pcm`` frame by frame as Ogg/Opus."""
    import sphn

    from duplex.server.frames import FrameAssembler

    writer, reader, frames = sphn.OpusStreamWriter(24000), sphn.OpusStreamReader(24000), FrameAssembler(FRAME)
    out = []
    for i in range(pcm.size // FRAME):
        page = writer.append_pcm(pcm[i * FRAME:(i + 1) * FRAME])
        if page:
            out.extend(frames.add(np.asarray(reader.append_bytes(page), dtype=np.float32)))
    return out


def session_seed(index: int) -> int:
    """The text and audio seed session ``index`` asks for (so that a sampling model's solo run compares)."""
    return 101 + index


def solo_text(models, pcm: np.ndarray, index: int, slots: int = 1) -> list[int]:
    """The session's answer alone: the conversation alone in slot 0 of an engine of the server's size
    (``slots``), stepping in order every frame the server would decode from it (text token ids)."""
    from duplex.server.engine import DuplexEngine
    from duplex.server.request import resolve_request
    from duplex.server.protocol import SessionParams

    engine = DuplexEngine(models.mimi, models.lm, slots, models.lm_gen_defaults, device=models.device)
    seed = session_seed(index)
    engine.join(0, resolve_request(SessionParams(text_seed=seed, audio_seed=seed), dict(models.lm_gen_defaults))[0])
    text = []
    alone = np.arange(slots) == 0  # [slots]
    for frame in through_opus(pcm):
        batch = np.zeros((slots, frame.shape[-1]), np.float32)
        batch[0] = frame
        out = engine.step(batch, alone)
        if out.has_output[0]:
            text.append(int(out.tokens[0, 0]))
    return text


async def run_client(url: str, index: int, pcm: np.ndarray, jitter_ms: float, phase: float, seed: int) -> ClientRun:
    """Stream ``pcm`` in real time (plus jitter), record every answer's text token and arrival."""
    from duplex.client.client import DuplexClient, ErrorEvent, MetadataEvent

    run = ClientRun(index=index, jitter_ms=jitter_ms)
    try:
        seed_param = str(session_seed(index))
        client = await DuplexClient.connect(url, params={"text_seed": seed_param, "audio_seed": seed_param},
                                            timeout=30)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        run.error = str(exc)
        return run
    frames = pcm.size // FRAME

    async def read() -> None:
        async for event in client:
            if isinstance(event, MetadataEvent):
                if event.data.get("type") == "tokens":
                    run.recv_times.append(time.perf_counter())
                    run.text.append(int(event.data["tokens"][0]))
                elif event.data.get("type") == "session":
                    run.session_id = event.data.get("session_id", "")
            elif isinstance(event, ErrorEvent):
                run.error = event.message

    reader = asyncio.ensure_future(read())
    rng = np.random.default_rng(seed)
    await asyncio.sleep(phase)
    start, latest = time.monotonic(), 0.0
    for i in range(frames):
        latest = max(latest, i * FRAME_SECONDS + float(rng.uniform(0.0, jitter_ms / 1000.0)))
        await asyncio.sleep(max(0.0, start + latest - time.monotonic()))
        run.send_times.append(time.perf_counter())
        await client.send_pcm(pcm[i * FRAME:(i + 1) * FRAME])
    deadline = time.monotonic() + 5.0
    while len(run.text) < frames - 1 and time.monotonic() < deadline and not run.error:
        await asyncio.sleep(0.02)
    await client.close()
    reader.cancel()
    return run


class SessionLog(logging.Handler):
    """Collects the server's per-session records (frames stepped, silence) by session id."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: dict[str, dict] = {}

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "session", None)
        if fields:
            self.records[fields["session_id"]] = fields


def summarise(run: ClientRun, solo: list[int], record: dict | None, delay: int) -> SessionResult:
    """Compare one client's answer with its solo run; latency = send of frame n+delay -> answer n."""
    equal = sum(1 for a, b in zip(run.text, solo) if a == b)
    lat = [(r - s) * 1e3 for r, s in zip(run.recv_times, run.send_times[delay:])] or [float("nan")]
    stepped = record.get("frames_in", 0) if record else 0
    return SessionResult(client=run, equal_pct=100.0 * equal / max(1, len(solo)),
                         silence=int(record.get("frames_late", 0)) if record else -1,
                         dropped=len(run.send_times) - stepped if record else -1,
                         p50_ms=float(np.median(lat)), p99_ms=float(np.percentile(lat, 99)))


def print_session_table(rows: list[tuple[int, float, SessionResult]]) -> None:
    """Per session: N, session, jitter, text equal to solo, silence, dropped, latency (ms), step cost."""
    header = ("N", "session", "jitter ms", "text = solo", "silence", "dropped", "latency p50/p99 ms",
              "step p50 ms")
    lines = [(str(n), str(r.client.index), f"{r.client.jitter_ms:g}", f"{r.equal_pct:.0f} %", str(r.silence),
              str(r.dropped), f"{r.p50_ms:.1f}/{r.p99_ms:.1f}", f"{step:.2f}") for n, step, r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")
