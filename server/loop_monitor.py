"""How late the event loop runs: a task that sleeps a fixed interval and records by how much it overslept.

Every session's socket reads, Opus decoding and encoding and sends run on the event loop; when something
hogs it (a connection flood, a slow callback), every conversation's audio stalls by that much. The lag
is exported as ``duplex_event_loop_lag_seconds`` (a histogram) and ``duplex_event_loop_lag_max_seconds``
(the worst of the last :data:`WINDOW_SECONDS`), and a lag over :data:`WARN_SECONDS` is logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

logger = logging.getLogger(__name__)

INTERVAL_SECONDS = 0.02  # the monitor's sleep: 50 wakeups per second
WINDOW_SECONDS = 10.0  # the max gauge covers this much recent time
WARN_SECONDS = 0.25  # a lag this long is logged (at most once per window)


class LoopLagMonitor:
    """Measures the loop's lag; ``record(lag)`` feeds the metrics, ``worst()`` the recent maximum."""

    def __init__(self, histogram, gauge, clock=time.monotonic) -> None:
        self.histogram = histogram
        self.gauge = gauge
        self.clock = clock
        self.recent: deque[tuple[float, float]] = deque()  # (time, lag), time-ordered, within the window
        self._last_warning = float("-inf")
        self._task: asyncio.Task | None = None

    def record(self, lag: float, now: float) -> None:
        self.histogram.observe(lag)
        while self.recent and self.recent[0][0] < now - WINDOW_SECONDS:
            self.recent.popleft()
        while self.recent and self.recent[-1][1] <= lag:  # keep a decreasing run: the max is the front
            self.recent.pop()
        self.recent.append((now, lag))
        self.gauge.set(self.recent[0][1])
        if lag >= WARN_SECONDS and now - self._last_warning >= WINDOW_SECONDS:
            self._last_warning = now
            logger.warning("the event loop was blocked for %.0f ms: every session's audio stalled that long",
                           1000 * lag)

    def worst(self) -> float:
        return self.recent[0][1] if self.recent else 0.0

    async def run(self) -> None:
        while True:
            before = self.clock()
            await asyncio.sleep(INTERVAL_SECONDS)
            now = self.clock()
            self.record(max(0.0, now - before - INTERVAL_SECONDS), now)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
