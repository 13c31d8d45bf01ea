"""``duplex bench engine-process``: the wall time of a model step driven from the server's worker thread, with
the engine in the server's process (``--no-engine-process``) or in a child (``--engine-process``), while the
server's interpreter is idle and while another thread keeps it busy the way a flooded event loop does.

In one process, each torch call of a step gives the interpreter lock up and must win it back from the busy
thread; in a child the step has its own interpreter, and the server's thread pays one pipe round trip."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time

import numpy as np
from duplex.bundle_args import add_model_arguments

from .engine import FRAME_SIZE
from .engine_process import EngineSpec, ProcessEngine, build_engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sessions", type=int, default=4, help="slots of the engine, all active (default: 4)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement (default: 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default: 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the engine (default: 1)")
    parser.add_argument("--real", action="store_true",
                        help="load the models the model flags name (as `duplex serve` does); default: the "
                             "tiny random demo models of `duplex serve --demo`")
    add_model_arguments(parser)


def main(args: argparse.Namespace) -> int:
    if args.sessions < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        print("error: --sessions, --steps and --threads must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    spec = EngineSpec(batch_size=args.sessions, model_args=EngineSpec.model_flags(args), demo=not args.real,
                      torch_threads=args.threads, log_level="WARNING")
    try:
        engines = {"thread": build_engine(spec)[1], "process": ProcessEngine(spec)}
    except Exception as exc:  # noqa: BLE001 - a model that cannot load: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.sessions} active sessions, {args.steps} steps, torch threads {args.threads}; step wall time (ms)")
    print(f"{'engine':<9}{'interpreter':<13}{'median':>8}{'p95':>8}{'max':>8}")
    try:
        for name, engine in engines.items():
            for busy in (False, True):
                times = timed_steps(engine, args.sessions, args.steps, args.warmup, busy)
                print(f"{name:<9}{'busy' if busy else 'idle':<13}{statistics.median(times):8.1f}"
                      f"{np.percentile(times, 95, method='nearest'):8.1f}{max(times):8.1f}")
    finally:
        engines["process"].close()
    return 0


def timed_steps(engine, sessions: int, steps: int, warmup: int, busy: bool) -> list[float]:
    """Wall ms of each step, called from a worker thread as the scheduler does, with or without a busy
    interpreter thread beside it."""
    for slot in range(sessions):
        engine.join(slot, None)
    pcm = (0.05 * np.random.default_rng(0).standard_normal((sessions, FRAME_SIZE))).astype(np.float32)  # [B, 1920]
    ready = np.ones(sessions, dtype=bool)
    times: list[float] = []

    def worker() -> None:
        for index in range(warmup + steps):
            start = time.perf_counter()
            engine.step(pcm, ready)
            if index >= warmup:
                times.append(1000 * (time.perf_counter() - start))

    stop = threading.Event()
    hog = threading.Thread(target=keep_interpreter_busy, args=(stop,), daemon=True)
    if busy:
        hog.start()
    runner = threading.Thread(target=worker)
    runner.start()
    runner.join()
    stop.set()
    if busy:
        hog.join()
    engine.reset_all()
    return times


def keep_interpreter_busy(stop: threading.Event) -> None:
    """Pure-Python work without pause, like an event loop parsing requests and messages of a flood."""
    message = {"type": "websocket.receive", "bytes": None, "text": "x" * 64, "headers": [("a", "b")] * 8}
    while not stop.is_set():
        json.loads(json.dumps(message))
        sum(i * i for i in range(100))
