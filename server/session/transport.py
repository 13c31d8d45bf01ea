"""How much of a session's output still sits on the server's side of the connection.

ASGI hides the socket, so this finds the server protocol's asyncio transport behind the websocket's
``send`` callable (uvicorn's protocol object, possibly wrapped in closures by Starlette or in objects
that keep the next ``send`` as ``_send``, like duplex's guard); where it
cannot, every figure is 0 and the slow-client rule falls back to the outbox alone. The bytes unsent
are the transport's write buffer plus, on Linux, the kernel's send queue (``TIOCOUTQ``: bytes not
yet acknowledged by the client's TCP stack): a client that does not read stops acknowledging once its
receive buffer is full, so these bytes grow, however large the kernel lets the send buffer become.
"""

from __future__ import annotations

import array
import fcntl
import logging
import termios

logger = logging.getLogger(__name__)


def find_transport(websocket, depth: int = 6):
    """The asyncio transport of a Starlette websocket served by uvicorn, or None."""
    return _search(getattr(websocket, "_send", None), depth)


def _search(obj, depth: int):
    if obj is None or depth < 0:
        return None
    owner = getattr(obj, "__self__", None)
    transport = getattr(owner, "transport", None)
    if transport is not None and hasattr(transport, "get_write_buffer_size"):
        return transport
    inner = getattr(owner, "_send", None)  # a wrapper object that forwards to the next send
    if inner is not None and inner is not obj:
        found = _search(inner, depth - 1)
        if found is not None:
            return found
    for cell in getattr(obj, "__closure__", None) or ():
        try:
            found = _search(cell.cell_contents, depth - 1)
        except ValueError:  # an empty cell
            continue
        if found is not None:
            return found
    return None


def unsent_bytes(transport) -> int:
    """Bytes written to the connection that the client has not received yet (as far as the server sees)."""
    if transport is None:
        return 0
    try:
        total = transport.get_write_buffer_size()
    except Exception:  # noqa: BLE001 - a closed transport
        return 0
    sock = transport.get_extra_info("socket")
    if sock is not None and hasattr(termios, "TIOCOUTQ"):
        try:
            buf = array.array("i", [0])
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
            total += buf[0]
        except (OSError, ValueError):  # not a TCP socket, or closed
            pass
    return total
