"""A raw-socket websocket client for transport tests: exact bytes, no library behaviour in between."""

from __future__ import annotations

import base64
import os
import socket
import struct
import time

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def upgrade_request(port: int, target: str = "/api/chat", headers: dict[str, str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def frame(opcode: int, payload: bytes = b"", fin: bool = True, length: int | None = None) -> bytes:
    """A masked client frame; ``length`` overrides the announced payload length (oversize tests)."""
    length = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", length)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class RawWebSocket:
    """Connect, upgrade (or not), send raw frames, read server frames."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def upgrade(self, target: str = "/api/chat", headers: dict[str, str] | None = None) -> str:
        """Send the upgrade; returns the response head (status line first)."""
        self.sock.sendall(upgrade_request(self.port, target, headers))
        return self.read_head()

    def read_head(self) -> str:
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head.decode("latin-1")

    def read_all(self, timeout: float = 10.0) -> bytes:
        """Everything until the server closes (or ``timeout``)."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        data = self.buffer
        self.buffer = b""
        try:
            while time.monotonic() < deadline:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of every complete unmasked server frame in ``data``."""
    frames, i = [], 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if length == 126:
            length = struct.unpack("!H", data[i:i + 2])[0]
            i += 2
        elif length == 127:
            length = struct.unpack("!Q", data[i:i + 8])[0]
            i += 8
        if i + length > len(data):
            break
        frames.append((opcode, data[i:i + length]))
        i += length
    return frames


def errors_and_close(data: bytes) -> tuple[list[str], int | None]:
    """The kind-5 error texts and the close code among server frames."""
    errors, code = [], None
    for opcode, payload in parse_frames(data):
        if opcode == OP_BINARY and payload[:1] == b"\x05":
            errors.append(payload[1:].decode("utf-8", errors="replace"))
        elif opcode == OP_CLOSE and len(payload) >= 2:
            code = struct.unpack("!H", payload[:2])[0]
    return errors, code
