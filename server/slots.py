"""The scheduler's parts: the engine it drives (``Engine`` = engine.SlotEngine, the Protocol the tests'
fakes implement), the output sink of a session, and a session's binding to a batch slot (inbox of user
frames, counters, lag clock)."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from duplex.server.engine import SlotEngine as Engine  # noqa: F401 - the engine the scheduler drives
from duplex.server.tick_policy import SlotView


class OutputSink(Protocol):
    """Receives a slot's output on the event loop thread."""

    def deliver(self, pcm: np.ndarray, text_id: int, tokens: np.ndarray, arrived: float | None) -> None:
        """One output frame: [1920] audio, the text token id, all [1 + dep_q] token ids, and the
        ``time.perf_counter()`` arrival of the user frame its step consumed."""

    def fail(self, reason: str, end_reason: str = "server_error") -> None:
        """The scheduler ends the session: ``reason`` is sent as kind 5, ``end_reason`` is logged."""


@dataclass(eq=False)
class SlotHandle:
    """Fields from ``slot`` to ``due`` are guarded by the scheduler lock."""

    slot: int
    sink: OutputSink
    loop: asyncio.AbstractEventLoop
    request: object  # a SlotRequest (sampling settings, adapter)
    inbox: deque = field(default_factory=deque)  # [1920] float32 frames not yet stepped
    arrivals: deque = field(default_factory=deque)  # perf_counter arrival of each inbox frame
    started: bool = False  # joined in the engine (its first frame is being or has been stepped)
    closed: bool = False
    frames_in: int = 0  # user frames stepped
    frames_caught_up: int = 0  # frames stepped in catch-up steps (the slot was behind)
    frames_silence: int = 0  # steps that advanced it with silence (only with an engine without a ready mask)
    last_arrival: float | None = None
    due: float | None = None  # when real-time playback needed the last stepped frame's answer (lag clock)
    space: asyncio.Event = field(default_factory=asyncio.Event)

    def view(self) -> SlotView:
        return SlotView(slot=self.slot, queued=len(self.inbox),
                        oldest_arrival=self.arrivals[0] if self.arrivals else None, last_arrival=self.last_arrival)

    def lag(self, now: float, frame_seconds: float) -> float:
        """Seconds this conversation runs behind real time (0 when nothing waits).

        The next frame is *due* one frame after the previous one was due, or when it arrived if that is
        later (a pause, or jitter, is the client's time, not the server's). A client faster than real
        time is never behind as long as its frames are stepped at 12.5 per second or faster.
        """
        if not self.inbox:
            return 0.0
        due = self.arrivals[0] if self.due is None else max(self.due + frame_seconds, self.arrivals[0])
        return max(0.0, now - due)

    def take(self, frame_seconds: float) -> tuple[np.ndarray, float]:
        """Pop the oldest frame and its arrival; advance the lag clock."""
        frame, arrived = self.inbox.popleft(), self.arrivals.popleft()
        self.due = arrived if self.due is None else max(self.due + frame_seconds, arrived)
        self.frames_in += 1
        return frame, arrived
