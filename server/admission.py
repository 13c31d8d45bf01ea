"""Admission: at most ``max_sessions`` conversations at once, the others wait in a FIFO queue.

A waiting client is told its 1-based position (through the ``on_position`` callback, which
sends kind-4 metadata) when it enters the queue and every time the queue moves. When the queue
already holds ``max_queue`` clients, :meth:`Admission.acquire` raises :class:`Busy` at once.
Admission also waits while ``accepting()`` says no (the scheduler's lag gate: sessions running
behind real time, see ``--max-lag-ms``): new clients queue even with a slot free, and are let in,
in order, once it says yes again (checked every :data:`GATE_POLL_SECONDS` while anyone waits).
All methods run on the event loop thread.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable

GATE_POLL_SECONDS = 0.1

from duplex.server.metrics import ServerMetrics


class Busy(Exception):
    """Every slot is taken and the queue is full."""


class Closed(Exception):
    """The server is shutting down and admits nobody."""


class _Waiter:
    def __init__(self) -> None:
        self.granted = False
        self.changed = asyncio.Event()


class Admission:
    """FIFO admission control with queue positions."""

    def __init__(self, max_sessions: int, max_queue: int, metrics: ServerMetrics | None = None,
                 accepting: Callable[[], bool] | None = None) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_sessions = max_sessions
        self.max_queue = max_queue
        self.metrics = metrics
        self.accepting = accepting or (lambda: True)
        self.active = 0
        self.closed = False
        self.closed_reason = "server shutting down"
        self._waiters: deque[_Waiter] = deque()

    @property
    def queue_length(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a free slot at once if there is one and nobody is waiting."""
        if self.closed or self.active >= self.max_sessions or self._waiters or not self.accepting():
            return False
        self.active += 1
        return True

    async def acquire(self, on_position: Callable[[int], Awaitable[None]]) -> None:
        """Wait for a slot. Raises Busy (queue full) or Closed (shutting down)."""
        if self.closed:
            raise Closed(self.closed_reason)
        if self.try_acquire():
            return
        if len(self._waiters) >= self.max_queue:
            what = (f"all {self.max_sessions} sessions are taken" if self.active >= self.max_sessions
                    else "the sessions running now are behind real time")
            raise Busy(f"server busy: {what} and {len(self._waiters)} clients are already waiting; "
                       "try again later")
        waiter = _Waiter()
        self._waiters.append(waiter)
        self._update_gauge()
        try:
            await self._wait(waiter, on_position)
        except BaseException:
            self._abandon(waiter)
            raise

    async def _wait(self, waiter: _Waiter, on_position: Callable[[int], Awaitable[None]]) -> None:
        sent = None
        while not waiter.granted:
            if self.closed:
                raise Closed(self.closed_reason)
            position = self._waiters.index(waiter) + 1
            waiter.changed.clear()
            if position != sent:
                await on_position(position)
                sent = position
            if not waiter.granted and not waiter.changed.is_set():
                try:
                    await asyncio.wait_for(waiter.changed.wait(), GATE_POLL_SECONDS)
                except asyncio.TimeoutError:
                    self._grant_free_slots()  # the gate may have opened

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter left (disconnect, error): give back what it held."""
        if waiter.granted:
            self.release()
        elif waiter in self._waiters:
            self._waiters.remove(waiter)
            self._notify_all()
        self._update_gauge()

    def release(self) -> None:
        """A session ended: free its slot and hand free slots to the first waiters."""
        self.active = max(0, self.active - 1)
        self._grant_free_slots()
        self._update_gauge()

    def _grant_free_slots(self) -> None:
        """Let waiters in, in order, while a slot is free and the gate accepts."""
        while self._waiters and not self.closed and self.active < self.max_sessions and self.accepting():
            waiter = self._waiters.popleft()
            waiter.granted = True
            self.active += 1
            self._notify_all(extra=waiter)
        self._update_gauge()

    def close(self, reason: str = "server shutting down") -> None:
        """Stop admitting: new and queued clients get Closed(reason) (the first reason given stays)."""
        if not self.closed:
            self.closed_reason = reason
        self.closed = True
        self._notify_all()

    def _notify_all(self, extra: _Waiter | None = None) -> None:
        for waiter in [*self._waiters, *([extra] if extra else [])]:
            waiter.changed.set()

    def _update_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.set(len(self._waiters))
