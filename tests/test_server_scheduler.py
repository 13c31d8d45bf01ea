"""The scheduler's late-session policy, with a fake engine and real-time pushes."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from duplex.server.engine import SlotSampling, StepOutput, StepTimings
from duplex.server.metrics import ServerMetrics
from duplex.server.scheduler import IDLE_AFTER_TICKS, Scheduler

FRAME = 1920


class FakeEngine:
    """Records which value each slot got per step; every slot always has output."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.frame_size = FRAME
        self.steps: list[tuple[float, np.ndarray]] = []  # (time, first sample of each slot)
        self.joined: list[int] = []
        self.lock = threading.Lock()

    def join(self, slot: int, sampling: SlotSampling | None = None) -> None:
        self.joined.append(slot)

    def step(self, pcm: np.ndarray) -> StepOutput:
        with self.lock:
            self.steps.append((time.monotonic(), pcm[:, 0].copy()))
        b = self.batch_size
        return StepOutput(pcm=pcm.copy(), tokens=np.zeros((b, 9), dtype=np.int64),
                          has_output=np.ones(b, dtype=bool), timings=StepTimings())


class Sink:
    def __init__(self) -> None:
        self.frames: list[float] = []

    def deliver(self, pcm, text_id, tokens, arrived=None) -> None:
        self.frames.append(float(pcm[0]))

    def fail(self, reason: str) -> None:
        raise AssertionError(reason)


def frame(value: float) -> np.ndarray:
    return np.full(FRAME, value, dtype=np.float32)


async def stream(scheduler: Scheduler, handle, values: list[float], phase: float, leave: bool) -> list[float]:
    """Push one frame every 80 ms after ``phase`` seconds; return the push times.

    With ``leave``, the session leaves once its last frame was stepped (a client that hangs up).
    """
    await asyncio.sleep(phase)
    start = time.monotonic()
    times = []
    for i, value in enumerate(values):
        await asyncio.sleep(max(0.0, start + 0.08 * i - time.monotonic()))
        times.append(time.monotonic())
        await scheduler.push(handle, frame(value))
    while leave and handle.inbox:
        await asyncio.sleep(0.005)
    if leave:
        scheduler.leave(handle)
    return times


def run_scenario(plans: dict[int, tuple[list[float], float, bool]], grace_s: float = 0.02):
    """Stream each slot's values in real time; return the engine, the metrics and the push times."""
    engine = FakeEngine(len(plans))
    metrics = ServerMetrics()
    scheduler = Scheduler(engine, metrics, grace_s=grace_s)
    scheduler.start()

    async def main():
        engine.sinks = {slot: Sink() for slot in plans}
        handles = {slot: scheduler.join(engine.sinks[slot], SlotSampling()) for slot in plans}
        pushes = await asyncio.gather(*(stream(scheduler, handles[s], *plan) for s, plan in plans.items()))
        await asyncio.sleep(0.3)
        for handle in handles.values():
            scheduler.leave(handle)
        return pushes

    try:
        pushes = asyncio.run(main())
    finally:
        scheduler.stop()
    return engine, metrics, pushes


def test_real_time_clients_out_of_phase_are_never_late():
    values_a = [float(i + 1) for i in range(12)]
    values_b = [float(100 + i) for i in range(12)]
    engine, metrics, _ = run_scenario({0: (values_a, 0.0, True), 1: (values_b, 0.05, True)}, grace_s=0.15)
    late = metrics.frames_late._value.get()
    assert late <= 1  # none in principle; one tolerated for a scheduling hiccup on a loaded machine
    stepped_a = [v[0] for _, v in engine.steps if v[0] != 0]
    stepped_b = [v[1] for _, v in engine.steps if v[1] != 0]
    assert stepped_a == values_a and stepped_b == values_b  # every frame once, in order, none replaced
    # lockstep: B joins one tick after A, then both share every tick (separate ticks would make ~24)
    assert len(engine.steps) <= 13 + late


def test_a_stalled_client_gets_silence_and_delays_the_others_at_most_once():
    values_a = [float(i + 1) for i in range(14)]
    plans = {0: (values_a, 0.0, True), 1: ([50.0, 51.0, 52.0], 0.02, False)}  # B stops after 3 frames
    grace = 0.2  # long, so that waiting for B at every tick stands out from scheduling jitter
    engine, metrics, pushes = run_scenario(plans, grace_s=grace)
    steps = engine.steps
    b_values = [v[1] for _, v in steps]
    assert b_values[:3] == [50.0, 51.0, 52.0] or b_values[1:4] == [50.0, 51.0, 52.0]
    # B is stepped with silence in the ticks after it stopped: the first IDLE_AFTER_TICKS count as late
    # (concealment, sent to B); then B is idle: still stepped, but nothing more is sent or counted.
    assert metrics.frames_late._value.get() == IDLE_AFTER_TICKS
    assert engine.sinks[1].frames == [50.0, 51.0, 52.0] + [0.0] * IDLE_AFTER_TICKS
    assert engine.sinks[0].frames == values_a
    # A's frame i is stepped soon after it is pushed: one wait of <= 80 ms + grace, then no waiting
    # (a policy that waited the grace for B at every tick would delay every later frame of A by 0.2 s).
    push_times = pushes[0]
    step_times = {v[0]: t for t, v in steps}
    delays = [step_times[value] - push_times[i] for i, value in enumerate(values_a)]
    assert max(delays) < 0.08 + grace + 0.3
    assert sum(d > 0.15 for d in delays) <= 3, delays


def test_a_lateness_burst_is_caught_up_by_dropping_the_owed_frames():
    """B holds 3 frames back (240 ms late), then sends them at once: the silence stepped in their place
    is paid back by dropping them, so B's later frames are stepped as promptly as before the burst."""
    engine = FakeEngine(2)
    metrics = ServerMetrics()
    scheduler = Scheduler(engine, metrics, grace_s=0.02)
    scheduler.start()
    values_a = [float(i + 1) for i in range(30)]
    values_b = [float(100 + i) for i in range(30)]
    held = range(10, 13)

    async def stream_b(handle) -> dict[float, float]:
        await asyncio.sleep(0.04)
        start = time.monotonic()
        pushed = {}
        for i, value in enumerate(values_b):
            due = start + 0.08 * (held.stop if i in held else i)  # the held frames go out with frame 13
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            pushed[value] = time.monotonic()
            await scheduler.push(handle, frame(value))
        return pushed

    async def main():
        a, b = scheduler.join(Sink(), SlotSampling()), scheduler.join(Sink(), SlotSampling())
        _, pushed = await asyncio.gather(stream(scheduler, a, values_a, 0.0, False), stream_b(b))
        deadline = time.monotonic() + 5
        while (a.inbox or b.inbox) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        scheduler.leave(a)
        scheduler.leave(b)
        return pushed, b

    try:
        pushed, handle_b = asyncio.run(main())
    finally:
        scheduler.stop()
    stepped_b = {v[1]: t for t, v in engine.steps if v[1] != 0}
    late = handle_b.frames_late
    assert late >= 2  # B really missed ticks during the burst
    assert handle_b.frames_dropped + handle_b.owed >= late  # every silence frame is paid back or still owed
    assert handle_b.frames_dropped >= 2 and handle_b.frames_dropped == metrics.frames_dropped.labels("in")._value.get()
    dropped = [v for v in values_b if v not in stepped_b]
    assert dropped == [100.0 + i for i in range(10, 10 + handle_b.frames_dropped)]  # the oldest late ones only
    # Without catching up, every frame after the burst would wait >= 2 extra ticks (>= 160 ms).
    tail = [stepped_b[v] - pushed[v] for v in values_b[18:]]
    assert sorted(tail)[len(tail) // 2] < 0.12, tail
