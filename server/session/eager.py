"""Starting a coroutine at once instead of one event-loop iteration later (Python 3.12's eager tasks, for 3.11).

``asyncio.ensure_future(coro)`` runs nothing now: the coroutine's first step waits for the next loop
iteration, behind every callback that is ready by then. A websocket send usually finishes without ever
suspending (the transport is writable). Run eagerly, it is on the wire before the current callback returns;
in a task it would wait behind everything else ready, tens of milliseconds in a connection flood.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def start_eagerly(coro: Coroutine[Any, Any, Any]) -> asyncio.Future | None:
    """Run ``coro`` now up to its first suspension.

    Returns None if it finished; an exception it raised is raised here. Otherwise returns a task that runs
    the rest. Cancelling that task closes the coroutine (its ``finally`` blocks run, even when the task is
    cancelled before its first step).
    """
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    task = asyncio.ensure_future(_resume(coro, waiting))
    task.add_done_callback(lambda _: coro.close())  # a no-op once the coroutine has finished
    return task


async def _resume(coro: Coroutine[Any, Any, Any], waiting: Any) -> Any:
    """Drive ``coro`` on from a suspension at ``waiting``: the future it awaits, or None (a bare yield)."""
    while True:
        if waiting is None:
            await asyncio.sleep(0)
        else:
            waiting._asyncio_future_blocking = False  # as a task does with the future it is handed
            await asyncio.wait([waiting])  # done (its result or exception is the coroutine's business)
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            return stop.value
