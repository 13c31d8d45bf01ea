"""Spreading the work of new connections over event-loop iterations (the flood rule of issue 13).

A connection's first request costs the event loop about half a millisecond: h11 parses the head; a
websocket upgrade is parsed again by websockets; the app then checks key, origin and limits, and
answers (often a refusal). The loop reads every socket that became readable in one go, so hundreds of
connections that arrive together (a flood, or every client of a restarted replica reconnecting) would
cost one iteration 100 ms or more. Every conversation's audio waits for that iteration to end.

:class:`HandshakeGate` takes each connection's first bytes instead, with its reading paused, and handles
them in one ready callback per loop iteration. That callback stops once it has spent
:data:`BUDGET_SECONDS`, and it queues itself behind whatever became ready meanwhile. Audio delivery from
the scheduler is one such callback, so it never waits behind more than one budget of handshakes (and
the app's answers to the connections released, which run as tasks right after). When
the loop has nothing else to do, the gate goes on at once, so a burst is still handled at full speed.

Only a connection's first bytes pass the gate. Later requests on a keep-alive connection and websocket
messages do not; they have their own bounds (see :mod:`duplex.server.transport`).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from typing import Protocol

BUDGET_SECONDS = 0.004  # handshake work per event-loop iteration while other work waits


class Gated(Protocol):
    """A connection waiting at the gate: :meth:`release_gate` handles its buffered first bytes."""

    def release_gate(self) -> None: ...


class HandshakeGate:
    """First bytes of new connections, handled FIFO, at most about ``budget`` seconds per loop iteration
    (the app's answer to a released request runs in tasks of its own, after this callback)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, budget: float = BUDGET_SECONDS) -> None:
        self._loop = weakref.ref(loop)  # the gate lives as long as its loop, not longer (see gate_for)
        self.budget = budget
        self.waiting: deque[Gated] = deque()
        self.gone: set[int] = set()  # ids of waiting connections that left (skipped when their turn comes)
        self.scheduled = False
        self.peak = 0  # most connections waiting at once (for tests and diagnostics)

    def enter(self, connection: Gated) -> None:
        """Queue ``connection``; its :meth:`release_gate` is called from a later loop callback."""
        self.waiting.append(connection)
        self.peak = max(self.peak, len(self.waiting))
        self._schedule()

    def leave(self, connection: Gated) -> None:
        """Forget ``connection`` (it closed, or was released early): it is skipped when its turn comes."""
        self.gone.add(id(connection))

    def _schedule(self) -> None:
        loop = self._loop()
        if not self.scheduled and self.waiting and loop is not None and not loop.is_closed():
            self.scheduled = True
            loop.call_soon(self._release_some)  # behind what became ready meanwhile (e.g. audio)

    def _release_some(self) -> None:
        self.scheduled = False
        deadline = time.perf_counter() + self.budget
        try:
            while self.waiting and time.perf_counter() < deadline:
                connection = self.waiting.popleft()
                if self.gone and id(connection) in self.gone:
                    self.gone.discard(id(connection))
                    continue
                connection.release_gate()
        finally:  # even if a release raised: the others get their turn
            if not self.waiting:
                self.gone.clear()
            self._schedule()


_GATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gate_for(loop: asyncio.AbstractEventLoop) -> HandshakeGate:
    """The gate of ``loop`` (one per event loop, made on first use)."""
    gate = _GATES.get(loop)
    if gate is None:
        gate = _GATES[loop] = HandshakeGate(loop)
    return gate
