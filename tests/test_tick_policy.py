"""The tick policy alone: a fake clock, no threads, no engine (duplex.server.tick_policy)."""

from __future__ import annotations

import random

import pytest

from duplex.server.tick_policy import SlotView, TickDecision, TickPolicy

F = 0.08  # one frame period


def policy(step_s: float = 0.01) -> TickPolicy:
    return TickPolicy(F, initial_step_s=step_s)


def test_nothing_queued_waits_for_a_frame():
    assert policy().decide(1.0, [SlotView(0, 0, None, 0.95), SlotView(1, 0)]).ready == ()
    assert policy().decide(1.0, [SlotView(0, 0, None, 0.95)]).wait_s is None


def test_every_slot_ready_steps_at_once_and_only_ready_slots_step():
    decision = policy().decide(1.0, [SlotView(0, 1, 1.0, 1.0), SlotView(2, 1, 0.999, 0.999)])
    assert decision.ready == (0, 2) and not decision.catch_up
    decision = policy().decide(1.0, [SlotView(0, 1, 1.0, 1.0), SlotView(1, 0, None, None)])  # 1 never sent
    assert decision.ready == (0,)


def test_a_frame_waits_for_a_neighbour_due_soon_but_at_most_one_steps_compute():
    p = policy(step_s=0.01)
    views = [SlotView(0, 1, 1.000, 1.000), SlotView(1, 0, None, 0.925)]  # 1's next frame is due at 1.005
    decision = p.decide(1.000, views)
    assert decision.ready == () and decision.wait_s == pytest.approx(0.01)
    assert p.decide(1.0101, views).ready == (0,)  # the window is over: step without it
    not_due = [SlotView(0, 1, 1.000, 1.000), SlotView(1, 0, None, 0.95)]  # due at 1.03: beyond the window
    assert p.decide(1.000, not_due).ready == (0,)


def test_a_paused_neighbour_is_not_waited_for():
    views = [SlotView(0, 1, 1.0, 1.0), SlotView(1, 0, None, 1.0 - 3 * F)]  # silent for 3 frames
    assert policy().decide(1.0, views).ready == (0,)


def test_a_slot_with_a_backlog_steps_at_once_as_catch_up():
    # (the neighbour's next frame is due at 1.06, after such a step would end: see the make-way test)
    decision = policy(step_s=0.05).decide(1.0, [SlotView(0, 3, 0.9, 1.0), SlotView(1, 0, None, 0.98)])
    assert decision.ready == (0,) and decision.catch_up
    old = policy(step_s=0.05).decide(1.0, [SlotView(0, 1, 0.919, 0.919), SlotView(1, 0, None, 0.98)])
    assert old.ready == (0,) and old.catch_up  # its only frame waited a whole period


def test_the_window_follows_the_measured_step_and_is_capped():
    p = TickPolicy(F)
    assert p.window == 0.0  # nothing measured yet: never wait
    p.observe_step(0.004)
    assert p.window == pytest.approx(0.004)
    for _ in range(50):
        p.observe_step(0.5)
    assert p.window == pytest.approx(F)


def simulate(arrivals: dict[int, list[float]], step_s: float, end: float = 60.0):
    """Run the policy against a fake clock: frames arrive at the given times; a step takes ``step_s``.

    Returns (records, steps): records[slot] = [(arrival, step start)] per frame in stepped order,
    steps = [(start, ready slots)].
    """
    p = TickPolicy(F, initial_step_s=step_s)
    pending = sorted((t, slot) for slot, times in arrivals.items() for t in times)
    queues: dict[int, list[float]] = {slot: [] for slot in arrivals}
    last: dict[int, float | None] = {slot: None for slot in arrivals}
    records: dict[int, list[tuple[float, float]]] = {slot: [] for slot in arrivals}
    steps, now = [], 0.0

    def admit(until: float) -> None:
        while pending and pending[0][0] <= until:
            t, slot = pending.pop(0)
            queues[slot].append(t)
            last[slot] = t

    while (pending or any(queues.values())) and now < end:
        admit(now)
        views = [SlotView(s, len(q), q[0] if q else None, last[s]) for s, q in queues.items()]
        decision = p.decide(now, views)
        if decision.ready:
            steps.append((now, decision.ready))
            for slot in decision.ready:
                records[slot].append((queues[slot].pop(0), now))
            now += step_s
            p.observe_step(step_s)
            continue
        wake = [pending[0][0]] if pending else []
        if decision.wait_s is not None:
            wake.append(now + decision.wait_s)
        now = max(now, min(wake)) if wake else end
    return records, steps


def real_time(frames: int, phase: float, jitter: float = 0.0, seed: int = 0) -> list[float]:
    """Arrival times of a real-time client: frame i sent at phase + i * F, delayed by up to ``jitter``,
    order kept (as over TCP)."""
    rng, times, latest = random.Random(seed), [], 0.0
    for i in range(frames):
        latest = max(latest, phase + i * F + rng.uniform(0.0, jitter))
        times.append(latest)
    return times


def waits(records, slot) -> list[float]:
    return [start - arrival for arrival, start in records[slot]]


@pytest.mark.parametrize("jitter", [0.0, 0.1, 0.25])
def test_simulated_jittery_neighbours_lose_nothing_and_never_delay_an_on_time_slot(jitter):
    step = 0.012
    arrivals = {0: real_time(100, 0.013)}
    arrivals.update({s: real_time(100, 0.02 * s, jitter, seed=s) for s in (1, 2, 3, 4, 5)})
    records, steps = simulate(arrivals, step)
    for slot, times in arrivals.items():
        assert [a for a, _ in records[slot]] == times  # every frame stepped once, in order: none dropped
    assert max(waits(records, 0)) <= step + 1e-9  # the on-time slot waits at most one step's compute
    if jitter == 0:  # all on time: nobody waits more than a step
        assert max(w for s in arrivals for w in waits(records, s)) <= step + 1e-9
    assert len(steps) < 6 * 100  # coalescing: fewer steps than frames


def test_simulated_burst_is_caught_up_in_back_to_back_steps():
    step = 0.01
    steady = real_time(60, 0.0)
    burst = real_time(60, 0.04)
    burst = [t if not 20 <= i < 30 else burst[29] for i, t in enumerate(burst)]  # 10 frames held, then at once
    records, _ = simulate({0: steady, 1: burst}, step)
    assert [a for a, _ in records[1]] == burst
    catch_up = [start for arrival, start in records[1][20:30]]
    assert catch_up[-1] - burst[29] <= 10 * step + 1e-9  # the backlog is gone within 10 steps
    assert max(waits(records, 1)[31:]) <= step + 1e-9  # then back to normal
    assert max(waits(records, 0)) <= step + 1e-9  # the steady neighbour is never delayed more than a step


def test_simulated_paused_client_is_not_stepped_while_silent():
    records, steps = simulate({0: real_time(50, 0.0), 1: real_time(10, 0.03) + real_time(10, 2.03)}, 0.01)
    during_pause = [ready for start, ready in steps if 0.03 + 10 * F <= start < 2.03]
    assert during_pause and all(1 not in ready for ready in during_pause)
    assert len(records[1]) == 20 and max(waits(records, 0)) <= 0.01 + 1e-9


def test_simulated_overload_loses_nothing_and_latency_grows():
    step = 0.1  # slower than real time
    arrivals = {s: real_time(40, 0.01 * s) for s in range(3)}
    records, _ = simulate(arrivals, step)
    for slot, times in arrivals.items():
        assert [a for a, _ in records[slot]] == times
    assert waits(records, 0)[-1] > waits(records, 0)[5] + 0.5  # behind, and more so over time


def test_catch_up_steps_rest_so_that_a_backlog_takes_at_most_its_share():
    p = TickPolicy(0.08, catch_up_share=0.8)
    backlog = SlotView(slot=0, queued=50, oldest_arrival=0.0, last_arrival=0.0)
    assert p.decide(1.0, [backlog]).catch_up  # behind: step at once
    p.observe_step(0.04, end=1.04, catch_up=True)  # a 40 ms catch-up step: then rest 10 ms
    assert p.decide(1.04, [backlog]) == TickDecision(wait_s=pytest.approx(0.01))
    assert p.decide(1.0501, [backlog]).catch_up
    # an on-time neighbour's frame does not wait for the rest: it steps by the coalescing rule, with the backlog
    fresh = SlotView(slot=1, queued=1, oldest_arrival=1.04, last_arrival=1.04)
    p.observe_step(0.04, end=1.04, catch_up=True)
    decision = p.decide(1.04 + p.window, [backlog, fresh])
    assert decision.ready == (0, 1)
    with pytest.raises(ValueError, match="catch_up_share"):
        TickPolicy(0.08, catch_up_share=0.0)


def test_the_catch_up_share_bounds_the_work_off_rate_in_simulation():
    """A 100-frame backlog at 40 ms a step with share 0.8: worked off in about 100 * 40 / 0.8 ms."""
    p = TickPolicy(0.08, catch_up_share=0.8)
    now, queued, steps = 0.0, 100, 0
    while queued:
        view = SlotView(slot=0, queued=queued, oldest_arrival=0.0, last_arrival=0.0)
        decision = p.decide(now, [view])
        if not decision.ready:
            now += decision.wait_s
            continue
        now += 0.04
        p.observe_step(0.04, end=now, catch_up=decision.catch_up)
        queued, steps = queued - 1, steps + 1
    assert steps == 100 and now == pytest.approx(100 * 0.04 / 0.8, rel=0.02)


def test_a_backlog_makes_way_for_an_on_time_frame_due_during_its_step():
    p = policy(step_s=0.03)
    backlog = SlotView(slot=0, queued=20, oldest_arrival=0.5, last_arrival=0.5)
    steady = SlotView(slot=1, queued=0, oldest_arrival=None, last_arrival=0.98)  # next frame due at 1.06
    assert p.decide(1.02, [backlog, steady]).catch_up  # the step would end at 1.05: before it is due
    held = p.decide(1.04, [backlog, steady])  # a step now would end after 1.06: wait for that frame
    assert held.ready == () and held.wait_s == pytest.approx(1.06 + 0.03 - 1.04)
    assert p.decide(1.0901, [backlog, steady]).catch_up  # late by more than a window: no longer waited for
    arrived = SlotView(slot=1, queued=1, oldest_arrival=1.06, last_arrival=1.06)
    assert p.decide(1.06, [backlog, arrived]) == TickDecision(ready=(0, 1), catch_up=True)
    paused = SlotView(slot=1, queued=0, oldest_arrival=None, last_arrival=1.04 - 3 * F)
    assert p.decide(1.04, [backlog, paused]).catch_up  # a paused neighbour is not waited for


def test_simulated_backlog_never_delays_a_steady_neighbour_and_is_still_worked_off():
    """Steps as long as 3/8 of a frame period: without making way, the steady slot's frames would often
    arrive during a catch-up step and wait for it."""
    step = 0.03
    steady = real_time(80, 0.0)
    backlog = [0.5] * 40 + real_time(30, 0.5 + 40 * F)  # 40 frames at once, then real time
    records, _ = simulate({0: steady, 1: backlog}, step)
    assert [a for a, _ in records[1]] == backlog and [a for a, _ in records[0]] == steady
    worked_off = records[1][39][1]  # the start of the backlog's last step
    assert worked_off - 0.5 <= 40 * F / 2 + F  # at least two of its frames per frame period
    during = [start - arrival for arrival, start in records[0] if 0.5 <= arrival <= worked_off]
    assert len(during) > 15 and max(during) <= 1e-9  # never waits: the engine is free whenever it is due
    assert max(waits(records, 0)) <= step + 1e-9  # (and the coalescing rule's bound holds throughout)


@pytest.mark.parametrize("step, phases", [(0.05, [0.0]), (0.06, [0.0]), (0.03, [0.0, 0.04]), (0.02, [0.0, 0.027, 0.054])])
def test_simulated_backlog_is_worked_off_even_when_no_step_of_its_own_fits_between_on_time_frames(step, phases):
    """Steps over half a period, or neighbours at spread phases: making way for every on-time frame would leave
    the backlog one shared step per period, its own arrival rate, for good. It still gets one step of its own
    per period, and the neighbours keep the coalescing rule's bound."""
    arrivals = {i: real_time(200, phase) for i, phase in enumerate(phases)}
    backlog = [0.5] * 40 + real_time(150, 0.5 + F + 0.013)  # 40 frames held back come at once, then real time
    slot = len(phases)
    arrivals[slot] = backlog
    records, _ = simulate(arrivals, step)
    assert [a for a, _ in records[slot]] == backlog
    assert max(waits(records, slot)[-10:]) <= step + 1e-9  # caught up: its last frames wait no more than a step
    for neighbour in range(len(phases)):
        assert max(waits(records, neighbour)) <= step + 1e-9
