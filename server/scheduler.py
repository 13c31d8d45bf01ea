"""The batched scheduler: one worker thread steps every active conversation together.

Threads. The event loop (websockets, Opus) never runs model code. Sessions push decoded
80 ms frames into their slot's bounded *inbox*; the worker thread waits for frames, runs one
:meth:`DuplexEngine.step` for the whole batch and hands each session its output through
``loop.call_soon_threadsafe``. Ticks are driven by incoming audio: with no frames, nothing runs.

Late sessions: lockstep with a grace period. The states of all slots advance together (a
batched step cannot leave one slot's streaming state untouched), so every tick steps every
running session. A tick starts as soon as every running, on-time session has a frame. Otherwise
it waits until ``grace_s`` after the frame was *due*: max(previous tick + 80 ms, first frame of
this tick ready) + grace. Real-time clients with different phases therefore never count as late
(the tick follows the last of them in each 80 ms cycle, so an early client's frame waits < 80 ms);
a client whose frame is really missing at the deadline gets 80 ms of silence (counted in
``duplex_frames_late``, like packet-loss concealment) and is marked *stalled*: later ticks do not
wait for it until one of its frames has been stepped again. A stalled or vanished client thus
delays the others once, by at most 80 ms + grace, and never corrupts them.
Idle sessions: a connected client that stops sending (end of a file, a muted client that sends
nothing) is stepped with silence like a late one, but after ``IDLE_AFTER_TICKS`` silence ticks in a
row it is *idle*: it stays in lockstep, its output is no longer sent and its ticks no longer count
as late (they are still owed, up to ``inbox_frames``), until one of its frames arrives again. So a silent client goes quiet after at most
``IDLE_AFTER_TICKS`` concealment frames instead of hearing the model forever while others talk.
Catching up: each silence frame is *owed* by the session. When its late frames arrive and more than
one is queued, the oldest is dropped for each owed frame (``duplex_frames_dropped{direction="in"}``),
so a burst of lateness does not leave a permanent backlog (with other sessions pacing the ticks, the
late frames would otherwise be stepped one tick late forever). Only inserted silence creates a debt:
clients that stream faster than real time never get silence and stay lossless.
Why not "step only ready slots"? It would need every streaming module (conv buffers, KV caches,
LM delay buffers) to support masked, per-slot state updates; lockstep keeps the step one plain
batched call and costs at most one frame of added latency per session.

Backlog: the inbox holds at most ``inbox_frames`` frames. A client that sends faster than real
time (file streaming) is throttled by backpressure (the session's feeder waits; once the session's
bounded receive buffer is full too, it stops reading its socket), so its user audio is never
dropped (only frames owed for stepped silence are, see above), and a fast client never makes the
ticks of real-time peers run faster. Known limit: a client whose audio clock runs faster than the slowest
peer's slowly builds a backlog (0.01 % drift = 0.36 s per hour); ``--max-session-seconds`` bounds it.
A session's first frame is handled by the engine's first frame rule; a joined session is not
waited for until its first frame has been stepped.

Ending: :meth:`Scheduler.leave` frees the slot at once and discards the session's unstepped frames
(its inbox, at most ``inbox_frames``). This holds for graceful shutdown too: the output already
produced is flushed to the client, but user audio received and not yet stepped gets no answer,
since the conversation is over when the client is told "server shutting down".

Cost: every tick runs the engine on all ``batch_size`` (``--max-sessions``) slots, in use or
not (free slots step silence), so a tick costs the same with 1 or N active sessions: size
``--max-sessions`` to the load, not above it.

Failures: if a step raises, the error is logged with its traceback, every active session ends
with a kind-5 "server error: ..." and the engine resets all slots; the worker keeps serving new
sessions. If the reset fails too (or steps fail ``MAX_CONSECUTIVE_FAILURES`` times in a row),
the worker stops for good: ``error`` is set, ``on_fatal`` stops admission (new clients get the
kind-5 error at once) and /healthz reports unavailable.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from duplex.server.engine import SlotSampling, StepOutput
from duplex.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3  # failed steps in a row (each followed by an engine reset) before giving up
IDLE_AFTER_TICKS = 2  # silence ticks in a row after which a session's output is held back (see "Idle")


def failure_message(exc: BaseException) -> str:
    """The kind-5 text a session gets when the model failed (no traceback)."""
    return f"server error: {type(exc).__name__}: {exc}".rstrip(": ")


class OutputSink(Protocol):
    """Receives a slot's output on the event loop thread."""

    def deliver(self, pcm: np.ndarray, text_id: int, tokens: np.ndarray, arrived: float | None) -> None:
        """One output frame: [1920] audio, the text token id, all [1 + dep_q] token ids, and the
        ``time.perf_counter()`` arrival of the user frame its step consumed (None: silence was stepped)."""

    def fail(self, reason: str) -> None:
        """The scheduler cannot go on: end the session with ``reason``."""


class SchedulerFull(RuntimeError):
    """No free slot (admission should have prevented this)."""


class SchedulerFailed(RuntimeError):
    """The worker stopped after an unrecoverable model failure: no session can start."""


@dataclass(eq=False)
class SlotHandle:
    """One session's binding to a batch slot. Fields from ``inbox`` to ``frames_late`` are guarded by the
    scheduler lock; ``tick_arrival`` is the worker thread's own."""

    slot: int
    sink: OutputSink
    loop: asyncio.AbstractEventLoop
    sampling: SlotSampling
    inbox: deque = field(default_factory=deque)
    arrivals: deque = field(default_factory=deque)  # arrival time of each inbox frame (or None)
    started: bool = False  # its first frame has been stepped
    stalled: bool = False  # missed the last tick; not waited for
    closed: bool = False
    frames_in: int = 0
    frames_late: int = 0
    frames_dropped: int = 0  # late user frames dropped to pay back the silence stepped in their place
    owed: int = 0  # silence frames stepped for this session and not yet paid back by a dropped frame
    silent_ticks: int = 0  # silence ticks in a row; above IDLE_AFTER_TICKS the session is idle
    tick_arrival: float | None = None  # arrival time of the frame stepped in the current tick
    space: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def idle(self) -> bool:
        """Stepped with silence more than IDLE_AFTER_TICKS times in a row: its output is held back."""
        return self.silent_ticks > IDLE_AFTER_TICKS


class Scheduler:
    """Owns a :class:`DuplexEngine` and runs its ticks in one worker thread."""

    def __init__(self, engine, metrics: ServerMetrics, grace_s: float = 0.03, inbox_frames: int = 8,
                 torch_threads: int | None = None) -> None:
        self.engine = engine
        self.torch_threads = torch_threads
        self.metrics = metrics
        self.grace_s = grace_s
        self.inbox_frames = inbox_frames
        self.batch_size = engine.batch_size
        self.frame_size = engine.frame_size
        self._cond = threading.Condition()
        self._handles: list[SlotHandle | None] = [None] * self.batch_size
        self._pcm = np.zeros((self.batch_size, self.frame_size), dtype=np.float32)  # [B, 1920]
        self.frame_seconds = self.frame_size / 24000.0
        self._last_tick = 0.0
        self.tick_observer = None  # optional callable(StepOutput, sessions stepped), for benchmarks
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set when the worker stopped for good
        self.on_fatal = None  # optional callable(exc), called from the worker thread when it stops for good
        metrics.max_sessions.set(self.batch_size)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name="duplex-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker thread after its current tick."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def active(self) -> int:
        """Slots bound to a session."""
        with self._cond:
            return sum(h is not None for h in self._handles)

    # ------------------------------------------------------------------ sessions (event loop side)
    def join(self, sink: OutputSink, sampling: SlotSampling) -> SlotHandle:
        """Bind a session to the lowest free slot; its state is reset when its first frame is stepped."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self.error is not None:
                raise SchedulerFailed(failure_message(self.error))
            for slot, handle in enumerate(self._handles):
                if handle is None:
                    new = SlotHandle(slot=slot, sink=sink, loop=loop, sampling=sampling)
                    self._handles[slot] = new
                    self.metrics.active_sessions.inc()
                    return new
        raise SchedulerFull(f"all {self.batch_size} slots are busy")

    def leave(self, handle: SlotHandle) -> None:
        """Unbind a session; its slot is free at once (pending frames are discarded)."""
        with self._cond:
            if handle.closed:
                return
            self._unbind(handle)
        handle.space.set()

    def _unbind(self, handle: SlotHandle) -> None:
        """Free the handle's slot and drop its pending frames; called with the lock held."""
        handle.closed = True
        handle.inbox.clear()
        handle.arrivals.clear()
        if self._handles[handle.slot] is handle:
            self._handles[handle.slot] = None
            self.metrics.active_sessions.dec()
        self._cond.notify_all()

    async def push(self, handle: SlotHandle, frame: np.ndarray, arrived: float | None = None) -> None:
        """Queue one [1920] frame for the session, waiting while its inbox is full (backpressure).

        ``arrived`` (``time.perf_counter()`` when the frame reached the server) travels with the
        frame to the output of the step that consumes it, for the per-frame latency metric.
        """
        while True:
            with self._cond:
                if handle.closed:
                    return
                if len(handle.inbox) < self.inbox_frames:
                    handle.inbox.append(frame)
                    handle.arrivals.append(arrived)
                    self._cond.notify_all()
                    return
                handle.space.clear()
            await handle.space.wait()

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a bug outside the step: report it and stop
            logger.exception("scheduler worker failed")
            self._stop_for_good(exc)

    def _loop(self) -> None:
        failures = 0
        while True:
            stepped = self._wait_and_gather()
            if stepped is None:
                return
            try:
                output = self.engine.step(self._pcm)
                failures = 0
                self._record(stepped, output)
                if self.tick_observer is not None:
                    self.tick_observer(output, len(stepped))
                self._dispatch(stepped, output)
            except Exception as exc:  # noqa: BLE001 - reported to every session, then recovered from
                failures += 1
                logger.exception("model step failed (%d in a row); ending every active session", failures)
                self._fail_all(exc)
                if not self._recover(exc, failures):
                    return

    def _recover(self, exc: Exception, failures: int) -> bool:
        """End every session after a failed step and reset the engine; False = the worker cannot go on."""
        if failures <= MAX_CONSECUTIVE_FAILURES:
            try:
                self.engine.reset_all()
                return True
            except Exception:  # noqa: BLE001 - the engine cannot be reset: the server is broken
                logger.exception("resetting the engine after a failed step failed")
        self._stop_for_good(exc)
        return False

    def _stop_for_good(self, exc: BaseException) -> None:
        logger.error("the model worker stops: the server admits nobody and /healthz reports unavailable")
        self.error = exc
        self._fail_all(exc)
        if self.on_fatal is not None:
            self.on_fatal(exc)

    def _wait_and_gather(self) -> list[SlotHandle] | None:
        """Block until a tick is due, then fill ``self._pcm`` and return the sessions stepped."""
        with self._cond:
            deadline = None
            while not self._stopping:
                bound = [h for h in self._handles if h is not None]
                if not any(h.inbox for h in bound):
                    deadline = None
                    self._cond.wait()
                    continue
                awaited = [h for h in bound if h.started and not h.stalled and not h.inbox]
                now = time.monotonic()
                if deadline is None:  # the frames of this tick were due one frame after the last tick
                    deadline = max(self._last_tick + self.frame_seconds, now) + self.grace_s
                if not awaited or now >= deadline:
                    self._last_tick = now
                    return self._gather(bound)
                self._cond.wait(deadline - now)
            return None

    def _gather(self, bound: list[SlotHandle]) -> list[SlotHandle]:
        """Take one frame per session (silence for late ones); called with the lock held."""
        self._pcm.fill(0.0)
        stepped = []
        for handle in bound:
            self._drop_owed(handle)
            if handle.inbox:
                self._pcm[handle.slot] = handle.inbox.popleft()
                handle.tick_arrival = handle.arrivals.popleft()
                handle.loop.call_soon_threadsafe(handle.space.set)
                handle.stalled = False
                handle.silent_ticks = 0
                handle.frames_in += 1
                if not handle.started:
                    self.engine.join(handle.slot, handle.sampling)
                    handle.started = True
            elif handle.started:
                handle.tick_arrival = None
                handle.stalled = True
                handle.silent_ticks += 1
                # Owed until paid back by a late frame; capped so that a client resuming after a long
                # pause loses at most an inbox's worth of audio to catching up.
                handle.owed = min(handle.owed + 1, self.inbox_frames)
                if not handle.idle:  # concealment of a late frame: counted and sent
                    handle.frames_late += 1
                    self.metrics.frames_late.inc()
            else:
                continue  # joined, first frame not yet here: its slot's output is ignored
            stepped.append(handle)
        return stepped

    def _drop_owed(self, handle: SlotHandle) -> None:
        """Catch up after lateness: each silence frame stepped for the session is paid back by dropping
        its oldest queued frame, while more than one is queued (lock held). Clients streaming faster
        than real time never got silence, so they owe nothing and lose nothing."""
        dropped = 0
        while handle.owed > 0 and len(handle.inbox) > 1:
            handle.inbox.popleft()
            handle.arrivals.popleft()
            handle.owed -= 1
            dropped += 1
        if dropped:
            handle.frames_dropped += dropped
            self.metrics.frames_dropped.labels("in").inc(dropped)

    def _record(self, stepped: list[SlotHandle], output: StepOutput) -> None:
        t = output.timings
        self.metrics.observe_step(t.encode, t.lm, t.decode)
        real = sum(1 for h in stepped if not h.stalled)
        self.metrics.tick_batch.observe(real)
        self.metrics.frames_in.inc(real)

    def _dispatch(self, stepped: list[SlotHandle], output: StepOutput) -> None:
        """Hand each stepped session its output on its event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle in stepped:
            if handle.closed or handle.idle or not output.has_output[handle.slot]:
                continue
            tokens = output.tokens[handle.slot].copy()  # [1 + dep_q]
            text_id = int(tokens[0])
            item = (handle, output.pcm[handle.slot].copy(), text_id, tokens, handle.tick_arrival)
            by_loop.setdefault(handle.loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver_all, items)
            except RuntimeError:  # the loop is closed: its sessions are gone
                logger.debug("event loop closed; %d outputs discarded", len(items))

    def _deliver_all(self, items: list) -> None:
        for handle, pcm, text_id, tokens, arrived in items:
            if handle.closed:
                continue
            try:
                handle.sink.deliver(pcm, text_id, tokens, arrived)
            except Exception as exc:  # noqa: BLE001 - one broken session must not starve the others
                logger.exception("session in slot %d failed to take its output", handle.slot)
                handle.sink.fail(f"server error: {type(exc).__name__}")

    def _fail_all(self, exc: BaseException) -> None:
        """Unbind every session (its pending frames are dropped) and end it with a kind-5 error."""
        with self._cond:
            handles = [h for h in self._handles if h is not None]
            for handle in handles:
                self._unbind(handle)
        reason = failure_message(exc)
        for handle in handles:
            try:
                handle.loop.call_soon_threadsafe(handle.sink.fail, reason)
            except RuntimeError:  # the loop is closed: its sessions are gone
                pass
            try:
                handle.loop.call_soon_threadsafe(handle.space.set)
            except RuntimeError:
                pass
