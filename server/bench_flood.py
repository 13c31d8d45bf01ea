"""``duplex bench flood``: idle connections and fast senders against a server while a real-time call goes on.

Prints how long the call's audio stopped at most, how the server answered the attackers and (for the
local server it starts) its memory before and after. Without ``--url`` it starts ``duplex serve --demo``
with 2 slots, a queue of 4, ``--handshake-seconds 2`` and 120 connections per minute and address, as
``tests/test_server_flood.py`` does. Every attacker comes from this machine's address, so the per-address
limits refuse most fast senders (429); run it against your own deployment only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from urllib.parse import urlsplit

import numpy as np
import psutil

from .flood import FloodReport, run_flood

LOCAL_SERVE_FLAGS = ("--demo", "--host", "127.0.0.1", "--port", "0", "--threads", "1", "--device", "cpu",
                     "--max-sessions", "2", "--max-queue", "4", "--handshake-seconds", "2",
                     "--client-connections-per-minute", "120")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="flood a running server at this ws:// (or wss://) URL of its /api/chat "
                                      "(your own: every attacker comes from this machine); default: start a "
                                      "local `duplex serve --demo` with 2 slots, a queue of 4, "
                                      "--handshake-seconds 2 and 120 connections per minute and address")
    parser.add_argument("--idle", type=int, default=500,
                        help="idle connections: half send half a request head, half nothing (default: 500)")
    parser.add_argument("--senders", type=int, default=200,
                        help="websocket clients that send 32 s of audio as fast as they can (default: 200)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the senders go on (default: 10)")
    parser.add_argument("--api-key", help="the canary call's key, for a server started with --api-key (the "
                                          "attackers present none)")


def main(args: argparse.Namespace) -> int:
    if args.idle < 0 or args.senders < 0 or args.seconds <= 0:
        print("duplex bench flood: --idle and --senders must be >= 0, --seconds > 0", file=sys.stderr)
        return 2
    try:
        if args.url:
            parts = urlsplit(args.url)
            if parts.scheme not in ("ws", "wss") or not parts.hostname:
                print(f"duplex bench flood: not a ws:// or wss:// URL: {args.url}", file=sys.stderr)
                return 2
            port = parts.port or (443 if parts.scheme == "wss" else 80)
            report = asyncio.run(run_flood(args.url, parts.hostname, port, args.idle, args.senders, args.seconds,
                                           api_key=args.api_key))
            print_report(args, report, server_gaps=None)
            return 0
        with local_server() as (process, port, lines):
            url = f"ws://127.0.0.1:{port}/api/chat"
            report = asyncio.run(run_flood(url, "127.0.0.1", port, args.idle, args.senders, args.seconds,
                                           measure=lambda: resident_bytes(process.pid)))
            print_report(args, report, server_gaps=server_side_gaps(lines))
        return 0
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"duplex bench flood: {exc}", file=sys.stderr)
        return 1


@contextmanager
def local_server(wait_s: float = 90.0):
    """`duplex serve --demo` with the flood limits on a free loopback port: (process, port, its log lines)."""
    process, port, lines = start_serve(*LOCAL_SERVE_FLAGS, wait_s=wait_s)
    try:
        yield process, port, lines
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def start_serve(*flags: str, wait_s: float = 90.0) -> tuple[subprocess.Popen, int, list[str]]:
    """`python -m duplex.cli serve FLAGS` (give "--port", "0"): the process, the port it logged, and its log
    lines (read on, in a thread). RuntimeError, with the log's end, when it does not start in ``wait_s``."""
    process = subprocess.Popen([sys.executable, "-m", "duplex.cli", "serve", *flags],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    ports: list[int] = []
    found = threading.Event()

    def read_log() -> None:
        for line in process.stderr:
            lines.append(line)
            match = re.search(r"duplex listening on \S+ port (\d+)", line)
            if match and not ports:
                ports.append(int(match.group(1)))
                found.set()
        found.set()

    threading.Thread(target=read_log, daemon=True).start()
    if not found.wait(wait_s) or not ports:
        process.kill()
        raise RuntimeError("duplex serve did not start:\n" + "".join(lines[-40:]))
    return process, ports[0], lines


def resident_bytes(pid: int) -> int:
    """Resident memory of a process and its children (the server and its engine process)."""
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def server_side_gaps(lines: list[str]) -> list[float]:
    """The session log's longest gap between two audio pages sent, of each call that got 50 frames or more."""
    ended = [json.loads(line.split("session ended ", 1)[1]) for line in lines if "session ended {" in line]
    return [e["max_audio_gap_ms"] for e in ended if e.get("frames_out", 0) >= 50]


def print_report(args: argparse.Namespace, report: FloodReport, server_gaps: list[float] | None) -> None:
    target = args.url or "a local `duplex serve --demo` (2 slots, queue 4, 120 connections/min per address)"
    gaps = report.gaps_ms
    senders = ", ".join(f"{key.replace('http_', 'HTTP ')}: {n}" for key, n in sorted(report.senders.items()))
    rows = [
        ("flood", f"{report.seconds:.1f} s"),
        ("idle connections answered 408", f"{sum(report.idle_answered)} of {len(report.idle_answered)}"),
        ("fast senders", senders or "none"),
    ]
    if gaps.size:
        rows.append(("canary's longest audio gap", f"{gaps.max():.0f} ms (p99 {np.percentile(gaps, 99):.0f} ms, "
                                                   f"median {np.median(gaps):.0f} ms, {gaps.size + 1} frames)"))
    else:
        rows.append(("canary's longest audio gap", "no audio during the flood"))
    if server_gaps:
        rows.append(("server's longest send gap", ", ".join(f"{g:.0f} ms" for g in server_gaps) + " (per call)"))
    before, after = report.measured.get("before"), report.measured.get("after")
    if before and after:
        rows.append(("server RSS (with its engine)", f"{before / 2**20:.0f} -> {after / 2**20:.0f} MiB "
                                                     f"({100 * (after / before - 1):+.1f} %)"))
    print(f"duplex bench flood: {args.idle} idle connections, {args.senders} fast senders, {args.seconds:g} s, "
          f"against {target}")
    for name, value in rows:
        print(f"  {name:32s} {value}")
