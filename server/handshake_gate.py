"""Spreading the work of new connections over event-loop iterations (the flood rule of issue 13).

A connection's first request costs the event loop about half a millisecond: h11 parses the head; a
websocket upgrade is parsed again by websockets; the app then checks key, origin and limits, and
answers (often a refusal). The loop reads every socket that became readable in one go, so hundreds of
connections that arrive together (a flood, or every client of a restarted replica reconnecting) would
cost one iteration 100 ms or more. Every conversation's audio waits for that iteration to end.

:class:`HandshakeGate` takes each connection's first bytes instead, with its reading paused, and handles
them in one ready callback per loop iteration. That callback stops once it has spent
:data:`BUDGET_SECONDS`, and it queues itself behind whatever became ready meanwhile. Audio delivery from
the scheduler is one such callback, so it never waits behind more than one budget of handshakes. When
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
    """First bytes of new connections, handled FIFO, at most about ``budget`` seconds per loop iteration."""

    def __init__(self, loop: asyncio.AbstractEventLoop, budget: float = BUDGET_SECONDS) -> None:
        self.loop = loop
        self.budget = budget
        self.waiting: deque[Gated] = deque()
        self.scheduled = False
        self.peak = 0  # most connections waiting at once (for tests and diagnostics)

    def enter(self, connection: Gated) -> None:
        """Queue ``connection``; its :meth:`release_gate` is called from a later loop callback."""
        self.waiting.append(connection)
        self.peak = max(self.peak, len(self.waiting))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._release_some)

    def leave(self, connection: Gated) -> None:
        """Forget ``connection`` (it closed, or was released early): it is not released again."""
        try:
            self.waiting.remove(connection)
        except ValueError:
            pass

    def _release_some(self) -> None:
        self.scheduled = False
        deadline = time.perf_counter() + self.budget
        while self.waiting:
            self.waiting.popleft().release_gate()
            if time.perf_counter() >= deadline:
                break
        if self.waiting:
            self.scheduled = True
            self.loop.call_soon(self._release_some)  # behind what became ready meanwhile (e.g. audio)


_GATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gate_for(loop: asyncio.AbstractEventLoop) -> HandshakeGate:
    """The gate of ``loop`` (one per event loop, made on first use)."""
    gate = _GATES.get(loop)
    if gate is None:
        gate = _GATES[loop] = HandshakeGate(loop)
    return gate
