"""Starting a coroutine at once instead of one event-loop iteration later (Python 3.12's eager tasks, for 3.11).

``asyncio.ensure_future(coro)`` runs nothing now: the coroutine's first step waits for the next loop
iteration, behind every callback that is ready by then. A websocket send usually finishes without ever
suspending (the transport is writable). Run eagerly, it is on the wire before the current callback returns;
in a task it would wait behind everything else ready, tens of milliseconds in a connection flood.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Coroutine
from typing import Any


def start_eagerly(coro: Coroutine[Any, Any, Any]) -> asyncio.Future | None:
    """Run ``coro`` now up to its first suspension.

    Returns None if it finished; an exception it raised is raised here. Otherwise returns a task that runs
    the rest, as if it had run the coroutine from the start: the task waits on the very future the
    coroutine waits on, and a cancellation reaches the coroutine as CancelledError where it waits.
    """
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    task = asyncio.ensure_future(_Rest(coro, waiting))
    task.add_done_callback(lambda _: coro.close())  # a no-op once it finished; else (cancelled before its
    return task                                      # first step) the coroutine's finally blocks run


class _Rest:
    """The rest of a coroutine that suspended at ``waiting``, as an awaitable a task can run."""

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting: Any) -> None:
        self.coro, self.waiting = coro, waiting

    def __await__(self):
        waiting = self.waiting
        while True:
            try:
                yield waiting  # the coroutine's own future (or None: a bare yield), handed to the task
            except BaseException as exc:  # noqa: BLE001 - thrown in by the task (CancelledError): pass it on
                step = functools.partial(self.coro.throw, exc)
            else:
                step = functools.partial(self.coro.send, None)
            try:
                waiting = step()
            except StopIteration as stop:
                return stop.value
