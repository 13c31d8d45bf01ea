"""The fleet recipe, tested: deploy/haproxy.cfg in front of two `duplex serve --demo` replicas (issue 13.6).

New calls spread over both (least connections); a full replica (/readyz 503) gets none; a draining replica
finishes its calls while new ones go to the other; a killed replica's clients get a clean end and the next
call lands on the survivor. Skipped, saying so, only where the haproxy binary is absent."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from test_server_drain import DemoServer, realtime_call, wait_for

from duplex.client.client import AudioEvent, ErrorEvent

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "haproxy.cfg"
pytestmark = [pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)"),
              pytest.mark.timeout(240)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def haproxy_config(front: int, replicas: list[int]) -> str:
    """deploy/haproxy.cfg with the test's ports (the shipped policy and timeouts unchanged)."""
    text = CONFIG.read_text()
    text = re.sub(r"bind 127\.0\.0\.1:\d+", f"bind 127.0.0.1:{front}", text)
    text = re.sub(r"^\s+server replica\d.*\n", "", text, flags=re.M)
    servers = "".join(f"    server replica{i + 1} 127.0.0.1:{port} check\n" for i, port in enumerate(replicas))
    return text.rstrip("\n") + "\n" + servers


def active(server: DemoServer) -> int:
    return server.get("/api/capacity")[1]["active"]


def test_haproxy_spreads_avoids_full_and_draining_replicas_and_survives_a_kill(tmp_path):
    with DemoServer("--max-sessions", "1", "--drain-seconds", "0") as one, \
            DemoServer("--max-sessions", "3", "--drain-seconds", "30") as two:
        front = free_port()
        config = tmp_path / "haproxy.cfg"
        config.write_text(haproxy_config(front, [one.port, two.port]))
        check = subprocess.run([HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        proxy = subprocess.Popen([HAPROXY, "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            asyncio.run(fleet_scenario(f"ws://127.0.0.1:{front}/api/chat", one, two))
        finally:
            proxy.terminate()
            proxy.wait(10)


async def fleet_scenario(url: str, one: DemoServer, two: DemoServer) -> None:
    await asyncio.sleep(2.5)  # the first health checks
    calls: dict[str, tuple[asyncio.Future, list, asyncio.Event]] = {}

    def call(name: str) -> list:
        log, stop = [], asyncio.Event()
        calls[name] = (asyncio.ensure_future(realtime_call(url, log, stop)), log, stop)
        return log

    async def started(log: list) -> None:
        await wait_for(lambda: any(isinstance(e, AudioEvent) for _, e in log), 20)

    async def hang_up(name: str) -> None:
        task, _, stop = calls[name]
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    # Spread: two calls, one on each replica (least connections).
    await started(call("a"))
    await started(call("b"))
    assert (active(one), active(two)) == (1, 1)
    # Full: replica one (1 slot) answers /readyz 503; the next calls all go to replica two.
    await asyncio.sleep(2.5)
    await started(call("c"))
    assert (active(one), active(two)) == (1, 2)
    # Draining: replica two gets SIGTERM; its calls go on, a new call goes to replica one (freed first).
    await hang_up("a")
    await wait_for(lambda: active(one) == 0)
    two.process.send_signal(signal.SIGTERM)
    await wait_for(lambda: two.get("/readyz")[0] == 503)
    await asyncio.sleep(2.5)
    drain_started = time.monotonic()
    await started(call("d"))
    assert active(one) == 1 and active(two) == 2
    await asyncio.sleep(2.0)
    for name in ("b", "c"):
        log = calls[name][1]
        assert any(isinstance(e, AudioEvent) and t > drain_started + 1.5 for t, e in log), name
        assert not calls[name][0].done()
    # Killed: replica two dies; its clients' calls end (with an error event, no hang); the next call lands on
    # the survivor.
    await hang_up("d")
    await wait_for(lambda: active(one) == 0)
    two.process.kill()
    for name in ("b", "c"):
        await asyncio.wait_for(calls[name][0], 10)
        assert isinstance(calls[name][1][-1][1], ErrorEvent)
    await asyncio.sleep(2.5)
    await started(call("e"))
    assert active(one) == 1
    await hang_up("e")
