"""The scheduler's worker with a masked fake engine and real threads: timing never changes answers."""

from __future__ import annotations

import asyncio
import random
import statistics
import time

from scheduler_fakes import HistoryEngine, Sink, frame, solo_outputs

from duplex.server.metrics import ServerMetrics
from duplex.server.request import SlotRequest
from duplex.server.scheduler import Scheduler

F = 0.08


def schedule(frames: int, phase: float = 0.0, jitter: float = 0.0, seed: int = 0,
             hold: range | None = None, pause: tuple[int, float] | None = None) -> list[float]:
    """Send times (seconds from the start) of a real-time client; ``jitter`` delays each frame by up to
    that much with order kept (as over TCP); frames in ``hold`` go out together with the frame after
    them (a burst); ``pause=(i, s)`` stops sending for ``s`` seconds before frame ``i``."""
    rng, times, latest = random.Random(seed), [], 0.0
    for i in range(frames):
        due = phase + i * F + (pause[1] if pause and i >= pause[0] else 0.0)
        if hold and i in hold:
            due = phase + hold.stop * F
        latest = max(latest, due + rng.uniform(0.0, jitter))
        times.append(latest)
    return times


def run(plans: dict[int, list[float]], step_seconds: float = 0.005, **scheduler_args):
    """Each client pushes frame values 1000*client + i at its planned times; returns sinks, handles,
    push times (perf_counter), the engine and the scheduler."""
    engine = HistoryEngine(len(plans), step_seconds=step_seconds)
    scheduler = Scheduler(engine, ServerMetrics(), inbox_frames=64, **scheduler_args)
    scheduler.start()
    sinks = {c: Sink() for c in plans}

    async def client(c: int, handle, times: list[float], start: float) -> list[float]:
        pushed = []
        for i, at in enumerate(times):
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            pushed.append(time.perf_counter())
            await scheduler.push(handle, frame(1000.0 * c + i), pushed[-1])
        deadline = time.perf_counter() + 10
        while len(sinks[c].frames) < len(times) and not sinks[c].failures and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        return pushed

    async def main():
        handles = {c: scheduler.join(sinks[c], SlotRequest(seed=c)) for c in plans}
        start = time.perf_counter() + 0.05
        pushes = await asyncio.gather(*(client(c, handles[c], t, start) for c, t in plans.items()))
        return handles, dict(zip(plans, pushes))

    try:
        handles, pushes = asyncio.run(main())
    finally:
        scheduler.stop()
    return sinks, handles, pushes, engine, scheduler


def expected(c: int, frames: int) -> list[float]:
    return solo_outputs([1000.0 * c + i for i in range(frames)])


def latencies(sink: Sink, pushed: list[float]) -> list[float]:
    return [t - p for t, p in zip(sink.times, pushed)]


def test_jittery_sessions_equal_their_solo_output_and_do_not_slow_an_on_time_neighbour():
    frames = 30
    alone, _, alone_pushes, _, _ = run({0: schedule(frames, 0.01)})
    plans = {0: schedule(frames, 0.01)}
    plans.update({c: schedule(frames, 0.013 * c, jitter=0.25 if c % 2 else 0.1, seed=c) for c in range(1, 6)})
    sinks, handles, pushes, engine, scheduler = run(plans)
    for c in plans:
        assert sinks[c].frames == expected(c, frames), c  # bit-identical to its solo run: nothing replaced
        assert handles[c].frames_in == frames
    assert scheduler.metrics.frames_late._value.get() == 0  # no silence stepped
    assert scheduler.metrics.frames_dropped.labels("in")._value.get() == 0  # no user frame dropped
    solo = statistics.median(latencies(alone[0], alone_pushes[0]))
    together = statistics.median(latencies(sinks[0], pushes[0]))
    # The lockstep scheduler delayed such a neighbour by ~120 ms; now by at most about one step (5 ms),
    # with 30 ms of slack for a loaded machine.
    assert together < solo + 0.005 + 0.03, (solo, together)
    assert any(r.sum() > 1 for _, r, _ in engine.steps)  # the sessions did share steps


def test_a_burst_is_caught_up_in_extra_steps():
    frames = 40
    plans = {0: schedule(frames), 1: schedule(frames, 0.04, hold=range(10, 20))}  # 10 frames held 0.8 s
    sinks, handles, pushes, _, scheduler = run(plans)
    assert sinks[1].frames == expected(1, frames) and sinks[0].frames == expected(0, frames)
    lat = latencies(sinks[1], pushes[1])
    assert max(lat[20:]) < 0.005 * 12 + 0.05  # the 11 queued frames are worked off back to back
    assert statistics.median(lat[25:]) < 0.03  # then latency is back to normal
    assert handles[1].frames_caught_up >= 5 and scheduler.metrics.catch_up_steps._value.get() >= 5
    assert statistics.median(latencies(sinks[0], pushes[0])) < 0.03


def test_a_client_that_stops_sending_pauses_its_conversation():
    frames = 20
    plans = {0: schedule(frames), 1: schedule(frames, 0.03, pause=(8, 0.8))}
    sinks, _, pushes, engine, scheduler = run(plans)
    assert sinks[1].frames == expected(1, frames) and sinks[0].frames == expected(0, frames)
    start = pushes[1][7] + 0.02
    end = pushes[1][8] - 0.001
    during = [ready for t, ready, _ in engine.steps if start < t < end]
    assert during and not any(ready[1] for ready in during)  # never stepped while silent
    assert sum(1 for t in sinks[1].times if start < t < end) == 0  # and nothing was sent to it
    assert scheduler.metrics.frames_late._value.get() == 0


def test_overload_keeps_answers_faithful_and_shows_the_lag():
    frames = 12
    plans = {c: schedule(frames, 0.01 * c) for c in range(3)}
    sinks, _, pushes, _, scheduler = run(plans, step_seconds=0.12)  # 1.5x slower than real time
    for c in plans:
        assert sinks[c].frames == expected(c, frames)  # nothing lost or replaced: faithful answers
    lat = latencies(sinks[0], pushes[0])
    assert lat[-1] > lat[1] + 0.2  # latency grows instead
    assert scheduler.real_time_factor > 1.2
    assert scheduler.metrics.real_time_factor._value.get() > 1.2
    assert scheduler.metrics.registry.get_sample_value("duplex_frames_in_total") == 3 * frames


def test_admission_gate_and_hard_bound_follow_the_lag():
    engine = HistoryEngine(2, step_seconds=0.15)
    metrics = ServerMetrics()
    scheduler = Scheduler(engine, metrics, inbox_frames=64, max_lag_s=0.2, hard_lag_s=0.6)
    scheduler.start()
    sink = Sink()

    async def main():
        handle = scheduler.join(sink, SlotRequest())
        assert scheduler.accepting()
        start, gate_closed = time.perf_counter(), False
        for i in range(40):
            await asyncio.sleep(max(0.0, start + i * F - time.perf_counter()))
            await scheduler.push(handle, frame(float(i)))
            gate_closed = gate_closed or not scheduler.accepting()
            if sink.failures:
                break
        await asyncio.sleep(0.3)
        return gate_closed

    try:
        gate_closed = asyncio.run(main())
    finally:
        scheduler.stop()
    assert gate_closed  # admission stopped while the lag exceeded 0.2 s
    assert len(sink.failures) == 1 and sink.failures[0][0] == "overloaded"
    assert "server overloaded" in sink.failures[0][1] and "behind real time" in sink.failures[0][1]
    assert sink.frames == solo_outputs([float(i) for i in range(len(sink.frames))])  # faithful until then
    assert scheduler.accepting() and scheduler.active == 0


def test_sessions_are_packed_into_the_lowest_slots_without_changing_their_output():
    engine = HistoryEngine(3)
    scheduler = Scheduler(engine, ServerMetrics(), inbox_frames=64)
    scheduler.start()
    sinks = [Sink() for _ in range(3)]

    async def main():
        handles = [scheduler.join(s, SlotRequest(seed=i)) for i, s in enumerate(sinks)]
        for i in range(12):
            if i == 5:
                scheduler.leave(handles[0])  # slot 0 frees: the session in slot 2 moves down
            for c, handle in enumerate(handles):
                if not handle.closed:
                    await scheduler.push(handle, frame(1000.0 * c + i))
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.1)
        return handles

    try:
        handles = asyncio.run(main())
    finally:
        scheduler.stop()
    assert ("move", 2, 0) in engine.calls and handles[2].slot == 0
    assert engine.requests[0] == SlotRequest(seed=2)  # the request moved with the state
    assert sinks[2].frames == expected(2, 12) and sinks[1].frames == expected(1, 12)
    assert ("leave", 0) in engine.calls


def test_capacity_reports_lag_and_the_admission_gate():
    from types import SimpleNamespace

    from duplex.server.admission import Admission
    from duplex.server.service import DuplexService

    engine = HistoryEngine(2)
    scheduler = Scheduler(engine, ServerMetrics(), max_lag_s=0.5)
    admission = Admission(2, 4, accepting=scheduler.accepting)
    settings = SimpleNamespace(max_sessions=2, max_queue=4)
    service = SimpleNamespace(scheduler=scheduler, admission=admission, settings=settings, draining=False,
                              refusal=lambda: None, loop_monitor=SimpleNamespace(worst=lambda: 0.0))
    report = lambda: DuplexService.capacity(service)  # noqa: E731 - the service's /api/capacity on these parts
    service.ready = lambda r=None: DuplexService.ready(service, r)
    first = report()
    assert (first["slots"], first["free"], first["max_lag_s"], first["accepting"], first["ready"]) == \
        (2, 2, 0.0, True, True)

    async def main():
        handle = scheduler.join(Sink(), SlotRequest())
        handle.inbox.append(frame(0.0))  # a frame waiting 2 s: the worker is not running
        handle.arrivals.append(time.perf_counter() - 2.0)
        return report()

    lagging = asyncio.run(main())
    assert lagging["max_lag_s"] >= 2.0 and lagging["lag_ms"] >= 2000.0
    assert not lagging["accepting"] and not lagging["ready"]  # a slot is free, but new clients would wait
    assert not admission.try_acquire()
