"""The batched scheduler: a thin worker thread that runs the tick policy's steps on the engine.

The event loop (websockets, Opus) never runs model code. Sessions push decoded 80 ms frames into
their slot's bounded inbox (:meth:`Scheduler.push`, backpressure beyond ``inbox_frames``); the worker
asks :class:`~duplex.server.tick_policy.TickPolicy` which slots step now, runs one masked
``engine.step(pcm, ready)`` for them and hands each stepped session its output on its event loop.
Slots without a frame are not stepped: no silence is stepped, no user frame is dropped, and a
session's output does not depend on when its frames arrive. Sessions are kept packed in the lowest
slots (``engine.move_slot``), so that the engine computes a small prefix of the batch. Failures: a
failed step ends every active session with a kind-5 error and resets the engine; after
``MAX_CONSECUTIVE_FAILURES`` (or a failed reset) the worker stops for good (``error``, ``on_fatal``).
Overload and lag: README, "Timing".
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from duplex.server.metrics import ServerMetrics
from duplex.server.slots import Engine, OutputSink, SlotHandle  # noqa: F401 - Engine re-exported
from duplex.server.tick_policy import TickPolicy

logger = logging.getLogger(__name__)

# Steps for backlogged sessions alone use at most this share of the worker's time (docs: tick_policy).
CATCH_UP_SHARE = 0.8
MAX_CONSECUTIVE_FAILURES = 3  # failed steps in a row (each followed by an engine reset) before giving up


def failure_message(exc: BaseException) -> str:
    """The kind-5 text a session gets when the model failed (no traceback)."""
    return f"server error: {type(exc).__name__}: {exc}".rstrip(": ")


class SchedulerFull(RuntimeError):
    """No free slot (admission should have prevented this)."""


class SchedulerFailed(RuntimeError):
    """The worker stopped after an unrecoverable model failure: no session can start."""


@dataclass
class Tick:
    """One step to run: the input, the ready mask and who gets output."""

    pcm: np.ndarray  # [B, frame_size] float32
    ready: np.ndarray  # [B] bool
    stepped: list  # (handle, slot, arrival) per ready slot
    catch_up: bool


def _accepts_ready(engine) -> bool:
    try:
        return "ready" in inspect.signature(engine.step).parameters
    except (TypeError, ValueError):
        return False


class Scheduler:
    """Owns an engine and runs its steps in one worker thread."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, inbox_frames: int = 8,
                 torch_threads: int | None = None, max_lag_s: float = 0.0, hard_lag_s: float = 0.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.engine = engine
        self.metrics = metrics
        self.inbox_frames = inbox_frames
        self.torch_threads = torch_threads
        self.max_lag_s = max_lag_s  # > 0: admission waits while a session lags more (see accepting)
        self.hard_lag_s = hard_lag_s  # > 0: a session lagging more ends with a kind-5 error
        self.clock = clock
        self.batch_size = engine.batch_size
        self.frame_size = engine.frame_size
        self.frame_seconds = self.frame_size / 24000.0
        self.policy = TickPolicy(self.frame_seconds, catch_up_share=CATCH_UP_SHARE)
        self.masked = _accepts_ready(engine)  # False: an engine without a ready mask (steps silence)
        self.packs = hasattr(engine, "move_slot") and hasattr(engine, "leave")
        if not self.masked:
            logger.warning("the engine has no ready mask: slots without a frame are stepped with silence")
        self._cond = threading.Condition()
        self._handles: list[SlotHandle | None] = [None] * self.batch_size
        self._left: list[int] = []  # engine slots whose session left, not yet told to the engine
        self._pcm = np.zeros((self.batch_size, self.frame_size), dtype=np.float32)  # [B, 1920]
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
        """Stop the worker thread after its current step."""
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

    def lags(self) -> list[float]:
        """Seconds each bound session runs behind real time (see SlotHandle.lag)."""
        now = self.clock()
        with self._cond:
            return [h.lag(now, self.frame_seconds) for h in self._handles if h is not None]

    def lag_seconds(self) -> float:
        """The largest session lag now (seconds; 0 when every session is on time or none is bound)."""
        return max(self.lags(), default=0.0)

    def capacity(self) -> dict:
        """The scheduler's part of GET /api/capacity (merged in by DuplexService.capacity)."""
        return {"max_lag_s": round(self.lag_seconds(), 4), "real_time_factor": round(self.real_time_factor, 4),
                "accepting": self.accepting()}

    def accepting(self) -> bool:
        """May a new session start now? Not after a fatal failure, nor while a session lags > max_lag_s."""
        if self.error is not None:
            return False
        return self.max_lag_s <= 0 or self.lag_seconds() <= self.max_lag_s

    @property
    def real_time_factor(self) -> float:
        """One step's compute (recent average) / one frame: above 1 no session can be held in real time."""
        return self.policy.step_estimate / self.frame_seconds

    # ------------------------------------------------------------------ sessions (event loop side)
    def join(self, sink: OutputSink, request) -> SlotHandle:
        """Bind a session to the lowest free slot; the engine is told at its first frame's step."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self.error is not None:
                raise SchedulerFailed(failure_message(self.error))
            for slot, handle in enumerate(self._handles):
                if handle is None:
                    new = SlotHandle(slot=slot, sink=sink, loop=loop, request=request)
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
            self.metrics.session_lag.labels(str(handle.slot)).set(0.0)
            if handle.started:
                self._left.append(handle.slot)
        self._cond.notify_all()

    async def push(self, handle: SlotHandle, frame: np.ndarray, arrived: float | None = None) -> None:
        """Queue one [1920] frame for the session, waiting while its inbox is full (backpressure).

        ``arrived`` (``time.perf_counter()`` when the frame reached the server; now when None) travels
        with the frame to the output of the step that consumes it (latency metric, lag clock).
        """
        while not self.try_push(handle, frame, arrived):
            await handle.space.wait()

    def try_push(self, handle: SlotHandle, frame: np.ndarray, arrived: float | None = None) -> bool:
        """:meth:`push` without waiting: False (and ``handle.space`` cleared) when the inbox is full.
        A closed handle takes (and drops) anything."""
        with self._cond:
            if handle.closed:
                return True
            if len(handle.inbox) < self.inbox_frames:
                stamp = self.clock() if arrived is None else arrived
                handle.inbox.append(frame)
                handle.arrivals.append(stamp)
                handle.last_arrival = stamp
                self._cond.notify_all()
                return True
            handle.space.clear()
            return False

    def inbox_space(self, handle: SlotHandle) -> int:
        """Frames the handle's inbox takes now without waiting (the worker only ever makes more room)."""
        with self._cond:
            return self.inbox_frames - len(handle.inbox)

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
            tick = self._next_tick()
            if tick is None:
                return
            try:
                output = self._step(tick)
                failures = 0
                self._dispatch(tick.stepped, output)
            except Exception as exc:  # noqa: BLE001 - reported to every session, then recovered from
                failures += 1
                logger.exception("model step failed (%d in a row); ending every active session", failures)
                self._fail_all(exc)
                if not self._recover(exc, failures):
                    return
            self._check_lag()

    def _next_tick(self) -> Tick | None:
        """Block until the policy says step, then take one frame from each ready slot."""
        with self._cond:
            while not self._stopping:
                self._apply_leaves_and_pack()
                bound = [h for h in self._handles if h is not None]
                decision = self.policy.decide(self.clock(), [h.view() for h in bound])
                if decision.ready:
                    return self._gather(decision.ready, decision.catch_up)
                self._cond.wait(decision.wait_s)
            return None

    def _apply_leaves_and_pack(self) -> None:
        """Tell the engine about ended sessions, then move sessions down into free lower slots (lock held)."""
        if not self.packs:
            self._left.clear()
            return
        for slot in self._left:
            self.engine.leave(slot)
        self._left.clear()
        for dst in range(self.batch_size):
            if self._handles[dst] is not None:
                continue
            src = max((s for s in range(dst + 1, self.batch_size) if self._handles[s] is not None), default=None)
            if src is None:
                return
            handle = self._handles[src]
            if handle.started:
                self.engine.move_slot(src, dst)
                self.engine.leave(src)
            self._handles[dst], self._handles[src] = handle, None
            self.metrics.session_lag.labels(str(src)).set(0.0)
            handle.slot = dst

    def _gather(self, slots: tuple[int, ...], catch_up: bool) -> Tick:
        """Take one frame per ready slot into the step's input (lock held)."""
        self._pcm.fill(0.0)
        ready = np.zeros(self.batch_size, dtype=bool)  # [B]
        stepped = []
        for slot in slots:
            handle = self._handles[slot]
            behind = len(handle.inbox) > 1
            frame, arrived = handle.take(self.frame_seconds)
            handle.loop.call_soon_threadsafe(handle.space.set)
            if catch_up and behind:
                handle.frames_caught_up += 1
            if not handle.started:
                self.engine.join(slot, handle.request)
                handle.started = True
            self._pcm[slot] = frame
            ready[slot] = True
            stepped.append((handle, slot, arrived))
        if not self.masked:  # a lockstep engine steps every bound slot: the others get silence
            for handle in self._handles:
                if handle is not None and handle.started and not ready[handle.slot]:
                    handle.frames_silence += 1
                    self.metrics.frames_late.inc()
        return Tick(pcm=self._pcm, ready=ready, stepped=stepped, catch_up=catch_up)

    def _step(self, tick: Tick):
        start = time.perf_counter()
        output = self.engine.step(tick.pcm, tick.ready) if self.masked else self.engine.step(tick.pcm)
        self.policy.observe_step(time.perf_counter() - start, end=self.clock(), catch_up=tick.catch_up)
        t = output.timings
        self.metrics.observe_step(t.encode, t.lm, t.decode)
        self.metrics.tick_batch.observe(len(tick.stepped))
        self.metrics.frames_in.inc(len(tick.stepped))
        self.metrics.real_time_factor.set(self.real_time_factor)
        if tick.catch_up:
            self.metrics.catch_up_steps.inc()
        if self.tick_observer is not None:
            self.tick_observer(output, len(tick.stepped))
        return output

    def _check_lag(self) -> None:
        """Publish every session's lag; end those past the hard bound with a kind-5 error."""
        now = self.clock()
        overloaded = []
        with self._cond:
            lags = []
            for handle in self._handles:
                if handle is None:
                    continue
                lag = handle.lag(now, self.frame_seconds)
                lags.append(lag)
                self.metrics.session_lag.labels(str(handle.slot)).set(lag)
                if self.hard_lag_s > 0 and lag > self.hard_lag_s:
                    overloaded.append((handle, lag))
                    self._unbind(handle)
            self.metrics.max_lag.set(max(lags, default=0.0))
        for handle, lag in overloaded:
            logger.warning("slot %d is %.1f s behind real time: ending it (--hard-lag-ms)", handle.slot, lag)
            message = (f"server overloaded: your conversation fell {lag:.1f} s behind real time "
                       f"(limit {self.hard_lag_s:g} s); try again later")
            self._tell(handle, handle.sink.fail, message, "overloaded")

    def _recover(self, exc: Exception, failures: int) -> bool:
        """Reset the engine after a failed step; False = the worker cannot go on."""
        if failures <= MAX_CONSECUTIVE_FAILURES:
            try:
                self.engine.reset_all()
                with self._cond:
                    self._left.clear()
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

    def _dispatch(self, stepped: list, output) -> None:
        """Hand each stepped session its output on its event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for handle, slot, arrived in stepped:
            if handle.closed or not output.has_output[slot]:
                continue
            tokens = output.tokens[slot].copy()  # [1 + dep_q]
            item = (handle, output.pcm[slot].copy(), int(tokens[0]), tokens, arrived)
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
            self._tell(handle, handle.sink.fail, reason)

    @staticmethod
    def _tell(handle: SlotHandle, callback, *args) -> None:
        """Run ``callback(*args)`` on the handle's event loop and wake its feeder (the loop may be gone)."""
        try:
            handle.loop.call_soon_threadsafe(callback, *args)
            handle.loop.call_soon_threadsafe(handle.space.set)
        except RuntimeError:  # the loop is closed: its sessions are gone
            pass
