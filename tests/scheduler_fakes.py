"""Fakes of the scheduler's Engine protocol (duplex.server.scheduler.Engine) for timing-free tests."""

from __future__ import annotations

import threading
import time

import numpy as np

from duplex.server.engine import StepOutput, StepTimings

FRAME = 1920


class HistoryEngine:
    """A masked engine whose output depends on each slot's whole input history (order and count).

    A slot's state is a running hash of the first sample of every frame it stepped; its output frame
    is that state. So a silence frame stepped in place of a late one, a dropped or reordered frame,
    or a neighbour's frame leaking into a slot all change every later output. Slots not ready keep
    their state and have no output. ``step_seconds`` makes each step take that long (compute).
    """

    def __init__(self, batch_size: int, step_seconds: float = 0.0) -> None:
        self.batch_size = batch_size
        self.frame_size = FRAME
        self.step_seconds = step_seconds
        self.state = np.zeros(batch_size, dtype=np.float64)
        self.requests: dict[int, object] = {}
        self.steps: list[tuple[float, np.ndarray, np.ndarray]] = []  # (time, ready [B], first samples [B])
        self.calls: list[tuple] = []  # ("join" | "leave" | "move", ...)
        self.lock = threading.Lock()

    def join(self, slot: int, request=None) -> None:
        self.state[slot] = 0.0
        self.requests[slot] = request
        self.calls.append(("join", slot))

    def leave(self, slot: int) -> None:
        self.calls.append(("leave", slot))

    def move_slot(self, src: int, dst: int) -> None:
        self.state[dst] = self.state[src]
        self.requests[dst] = self.requests.get(src)
        self.calls.append(("move", src, dst))

    def reset_all(self) -> None:
        self.state[:] = 0.0

    def step(self, pcm: np.ndarray, ready: np.ndarray | None = None) -> StepOutput:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        ready = np.ones(self.batch_size, dtype=bool) if ready is None else np.asarray(ready, dtype=bool)
        first = pcm[:, 0].astype(np.float64)  # [B]
        with self.lock:
            self.steps.append((time.monotonic(), ready.copy(), first.copy()))
        self.state = np.where(ready, expected_next(self.state, first), self.state)
        out = np.repeat(self.state.astype(np.float32)[:, None], FRAME, axis=1)  # [B, 1920]
        tokens = np.zeros((self.batch_size, 9), dtype=np.int64)
        return StepOutput(pcm=out, tokens=tokens, has_output=ready.copy(), timings=StepTimings(lm=self.step_seconds))


def expected_next(state, value):
    """The fake's state update (a hash that depends on order)."""
    return np.mod(state * 31.0 + value + 1.0, 1_000_003.0)


def solo_outputs(values: list[float]) -> list[float]:
    """What HistoryEngine gives a slot that steps ``values`` in order from a fresh join."""
    state, out = 0.0, []
    for value in values:
        state = float(expected_next(np.float64(state), np.float64(np.float32(value))))
        out.append(float(np.float32(state)))
    return out


class Sink:
    """An OutputSink that records what it got and when (time.monotonic)."""

    def __init__(self) -> None:
        self.frames: list[float] = []
        self.times: list[float] = []
        self.arrivals: list[float | None] = []
        self.failures: list[tuple[str, str]] = []

    def deliver(self, pcm, text_id, tokens, arrived=None) -> None:
        self.frames.append(float(pcm[0]))
        self.times.append(time.perf_counter())
        self.arrivals.append(arrived)

    def fail(self, reason: str, end_reason: str = "server_error") -> None:
        self.failures.append((end_reason, reason))


def frame(value: float) -> np.ndarray:
    return np.full(FRAME, value, dtype=np.float32)
