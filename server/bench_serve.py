"""`duplex bench serve`: N real-time websocket clients against one batched server.

For each N in ``--sessions``: a server with ``--max-sessions N`` runs in this process (uvicorn in a
thread); a separate client process opens N websocket connections over loopback, each streaming its
own audio in real time (one 80 ms Ogg/Opus frame every 80 ms, random phases; with ``--jitter MS``
every odd-numbered session's frames are delayed by up to MS, order kept) and recording the model's
token ids and when each answer came back. Each session's input is also run alone, offline, on an
engine of the server's size: its *solo* answer. Printed per N: step cost by stage (median / p99), whether all
N sessions were held in real time, memory, the cost of one batched tick against N single-slot steps;
and per session: text tokens equal to its solo run (%), frames stepped as silence and user frames
dropped (both must be 0), and the answer latency p50 / p99 (send of a frame -> its answer received).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from duplex.server import protocol

logger = logging.getLogger(__name__)

FRAME = protocol.FRAME_SIZE
FRAME_SECONDS = 0.08


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from duplex.bundle_args import add_model_arguments

    parser.add_argument("--sessions", default="1,2,4,8,16",
                        help="comma-separated numbers of concurrent real-time clients (default: 1,2,4,8,16)")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio streamed by each client (default: 10)")
    parser.add_argument("--input", type=Path, default=None,
                        help="WAV file each client streams (resampled to 24 kHz mono); default: synthetic audio")
    parser.add_argument("--preset", choices=("tiny", "random", "files"), default="tiny",
                        help="tiny: the test fixtures (default); random: random weights from --config "
                        "(default Moshi 7B) and --mimi-config (default published Mimi); files: the model flags")
    parser.add_argument("--fixtures", type=Path, default=None,
                        help="fixtures folder for --preset tiny (default: $DUPLEX_FIXTURES or ../shared/fixtures)")
    parser.add_argument("--jitter", type=float, default=0.0, metavar="MS",
                        help="delay each frame of every odd-numbered session by a uniform 0..MS ms, order kept "
                        "(network jitter; default: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the model worker")
    parser.add_argument("--compare-steps", type=int, default=30,
                        help="timed engine steps for the batched vs sequential comparison (default: 30)")
    add_model_arguments(parser)


@dataclass
class RunResult:
    sessions: int
    ticks: list  # (encode, lm, decode) seconds per tick
    late: float
    dropped: float
    missing: int
    errors: list
    rss_mb: float
    gpu_mb: float
    batched_ms: float
    single_ms: float
    per_session: list = field(default_factory=list)  # SessionResult per client

    def stage(self, index: int | None) -> tuple[float, float]:
        """(median, p99) milliseconds of one stage (None = total)."""
        values = [sum(t) if index is None else t[index] for t in self.ticks] or [float("nan")]
        return statistics.median(values) * 1e3, float(np.percentile(values, 99)) * 1e3

    @property
    def real_time(self) -> bool:
        return (self.stage(None)[1] < FRAME_SECONDS * 1e3 and self.late == 0 and self.dropped == 0
                and self.missing == 0 and not self.errors)


def main(args: argparse.Namespace) -> int:
    import torch

    counts = [int(n) for n in str(args.sessions).split(",") if n.strip()]
    if not counts or min(counts) < 1:
        print("--sessions must be a comma-separated list of positive integers")
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("duplex.server.sessions").setLevel(logging.WARNING)  # one line per client is noise here
    models = load_bench_models(args)
    audio = bench_audio(args.input, args.seconds)
    print(f"model {models.model_name} on {models.device} ({str(models.dtype).replace('torch.', '')}), "
          f"{args.seconds:g} s of audio per client, jitter {args.jitter:g} ms on odd-numbered sessions")
    results = [run_one(models, n, audio, args) for n in counts]
    print_table(results)
    print_sessions(results)
    return 0


def load_bench_models(args: argparse.Namespace):
    """The models of the chosen preset (see --preset)."""
    from duplex.bundle import load_models_from_paths
    from duplex.bundle_args import load_models

    if args.preset == "files":
        return load_models(args)
    if args.preset == "random":
        return random_models(args)
    fixtures = args.fixtures or Path(os.environ.get("DUPLEX_FIXTURES", Path(__file__).resolve().parents[2]
                                                    / "shared" / "fixtures"))
    tokenizer = _tiny_tokenizer(Path(tempfile.mkdtemp(prefix="duplex-bench-")))
    return load_models_from_paths(fixtures / "lm_tiny" / "model.safetensors",
                                  fixtures / "mimi_tiny" / "model.safetensors", tokenizer,
                                  config=fixtures / "lm_tiny" / "config.json",
                                  mimi_config=fixtures / "mimi_tiny" / "config.json", model_name="tiny")


def random_models(args: argparse.Namespace):
    """Random weights (e.g. the 7B config on a GPU): real shapes and costs, meaningless output."""
    import torch

    from duplex.codec.config import MimiConfig
    from duplex.codec.mimi import Mimi
    from duplex.model.config import LMConfig
    from duplex.model.lm import LMModel
    from duplex.bundle import LoadedModels
    from duplex.bundle_args import pick_device, pick_dtype

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(0)
    lm_config = LMConfig.from_kyutai(args.config) if args.config else LMConfig.moshi_7b()
    lm = LMModel(lm_config, device=device, dtype=dtype).eval()
    mimi_config = MimiConfig.from_kyutai(args.mimi_config) if args.mimi_config else MimiConfig.official()
    mimi = Mimi(mimi_config, num_codebooks=lm_config.dep_q).to(device).eval()
    name = f"random {Path(args.config).name if args.config else 'moshi-7b'}"
    return LoadedModels(mimi=mimi, lm=lm, lm_gen_defaults={"use_sampling": True}, tokenizer=_NoText(),
                        model_name=name, device=device, dtype=dtype)


class _NoText:
    """Tokenizer stand-in for random weights: no text pieces."""

    def piece(self, token_id: int) -> None:
        return None


def _tiny_tokenizer(folder: Path) -> Path:
    """A 100-piece sentencepiece model for the tiny LM's text stream (trained in a second)."""
    import sentencepiece as spm

    words = [f"w{i}{chr(97 + i % 26)}" for i in range(300)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(300)) + "\n")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tiny"), vocab_size=100,
                                   model_type="word", pad_id=3, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    return folder / "tiny.model"


def bench_audio(path: Path | None, seconds: float) -> np.ndarray:
    """[frames * 1920] float32 at 24 kHz: the WAV (looped) or a synthetic voice-like signal."""
    frames = max(3, int(round(seconds / FRAME_SECONDS)))
    if path is None:
        t = np.arange(frames * FRAME) / 24000.0
        signal = 0.3 * np.sin(2 * np.pi * 200 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
        return signal.astype(np.float32)
    import sphn

    pcm, rate = sphn.read(str(path))
    mono = np.asarray(pcm, dtype=np.float32).mean(axis=0)
    if rate != protocol.SAMPLE_RATE:
        mono = sphn.resample(mono, src_sample_rate=rate, dst_sample_rate=24000)
    return np.resize(mono, frames * FRAME).astype(np.float32)


def run_one(models, sessions: int, audio: np.ndarray, args: argparse.Namespace) -> RunResult:
    """One server with ``sessions`` slots and as many real-time clients (odd ones jittered)."""
    import torch

    from duplex.client.bench_support import ServerThread
    from duplex.server.app import create_app
    from duplex.server.bench_sessions import SessionLog, session_audio, solo_text, summarise
    from duplex.server.service import ServerSettings

    if models.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(models.device)
    settings = ServerSettings(max_sessions=sessions, max_queue=0, torch_threads=args.threads, send_tokens=True)
    app = create_app(models, settings)
    service = app.state.service
    ticks: list = []
    warmup = [8]

    def observe(output, stepped: int) -> None:
        if warmup[0] > 0:
            warmup[0] -= 1
            return
        t = output.timings
        ticks.append((t.encode, t.lm, t.decode))

    service.scheduler.tick_observer = observe
    log = SessionLog()
    session_logger = logging.getLogger("duplex.server.sessions")
    session_logger.addHandler(log)
    session_logger.setLevel(logging.INFO)
    session_logger.propagate = False  # collected, not printed (one line per client is noise here)
    try:
        with ServerThread(app=app) as server:
            runs = _run_clients(server.url, sessions, audio, args.jitter)
            deadline = time.monotonic() + 5
            while len(log.records) < sessions and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        session_logger.removeHandler(log)
        session_logger.propagate = True
    metrics = service.metrics
    expected = audio.size // FRAME - 1
    delay = models.lm.config.max_delay
    per_session = [summarise(run, solo_text(models, session_audio(audio, run.index), run.index, sessions),
                             log.records.get(run.session_id), delay) for run in runs]
    result = RunResult(
        sessions=sessions, ticks=ticks, late=metrics.frames_late._value.get(),
        dropped=metrics.frames_dropped.labels("out")._value.get() + sum(max(0, r.dropped) for r in per_session),
        missing=sum(max(0, expected - len(run.text)) for run in runs), errors=[run.error for run in runs if run.error],
        rss_mb=psutil.Process().memory_info().rss / 2**20,
        gpu_mb=torch.cuda.max_memory_allocated(models.device) / 2**20 if models.device.type == "cuda" else 0.0,
        batched_ms=0.0, single_ms=0.0, per_session=per_session,
    )
    result.batched_ms = engine_step_ms(service.engine, args.compare_steps)
    del app, service
    gc.collect()
    result.single_ms = engine_step_ms(None, args.compare_steps, models=models)
    print(f"  N={sessions}: tick p50 {result.stage(None)[0]:.1f} ms, p99 {result.stage(None)[1]:.1f} ms, "
          f"silence {result.late:g}, dropped {result.dropped:g}, missing {result.missing}", flush=True)
    return result


def engine_step_ms(engine, steps: int, models=None) -> float:
    """Median ms of one engine step on noise (a fresh single-slot engine when ``engine`` is None)."""
    from duplex.server.engine import DuplexEngine

    if engine is None:
        engine = DuplexEngine(models.mimi, models.lm, 1, models.lm_gen_defaults, device=models.device)
    pcm = (np.random.default_rng(0).standard_normal((engine.batch_size, FRAME)) * 0.1).astype(np.float32)
    for slot in range(engine.batch_size):
        engine.join(slot)
    for _ in range(3):
        engine.step(pcm)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step(pcm)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _run_clients(url: str, sessions: int, audio: np.ndarray, jitter_ms: float) -> list:
    """Run the clients in a child process (its own GIL); one ClientRun per client."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_client_process, args=(url, sessions, audio, jitter_ms, queue), daemon=True)
    process.start()
    timeout = audio.size / 24000.0 + 60
    try:
        return queue.get(timeout=timeout)
    finally:
        process.join(10)


def _client_process(url: str, sessions: int, audio: np.ndarray, jitter_ms: float, queue) -> None:
    queue.put(asyncio.run(_clients(url, sessions, audio, jitter_ms)))


async def _clients(url: str, sessions: int, audio: np.ndarray, jitter_ms: float) -> list:
    from duplex.server.bench_sessions import jitter_of, run_client, session_audio

    rng = np.random.default_rng(sessions)
    return list(await asyncio.gather(*(
        run_client(url, i, session_audio(audio, i), jitter_of(i, jitter_ms), float(rng.uniform(0, FRAME_SECONDS)),
                   seed=1000 * sessions + i)
        for i in range(sessions))))


def print_sessions(results: list[RunResult]) -> None:
    """The per-session table (text equal to solo, silence, dropped, latency, the step cost at that load)."""
    from duplex.server.bench_sessions import print_session_table

    print()
    print_session_table([(r.sessions, r.stage(None)[0], s) for r in results for s in r.per_session])


def print_table(results: list[RunResult]) -> None:
    """The benchmark table (milliseconds)."""
    header = ("N", "ticks", "encode p50/p99", "LM p50/p99", "decode p50/p99", "tick p50/p99", "silence", "dropped",
              "real-time", "RSS MB", "GPU MB", "batched", "N x single", "speedup")
    rows = []
    for r in results:
        stages = [r.stage(i) for i in (0, 1, 2, None)]
        sequential = r.single_ms * r.sessions
        rows.append((str(r.sessions), str(len(r.ticks)), *(f"{a:.2f}/{b:.2f}" for a, b in stages),
                     f"{r.late:g}", f"{r.dropped:g}",
                     f"{'yes' if r.real_time else 'NO'} ({r.sessions if r.real_time else 0}/{r.sessions})",
                     f"{r.rss_mb:.0f}", f"{r.gpu_mb:.0f}", f"{r.batched_ms:.2f}", f"{sequential:.2f}",
                     f"{sequential / r.batched_ms:.1f}x" if r.batched_ms else "-"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
    for r in results:
        if r.errors:
            print(f"N={r.sessions} client errors: {sorted(set(r.errors))}")
