"""`duplex bench server` smoke run: a short real-time stream to the in-process tiny server."""

from __future__ import annotations

import re

import pytest

from duplex.cli import main as duplex_main


def test_bench_server_runs_and_loses_no_frame(fixtures_dir, capsys):
    code = duplex_main(["bench", "server", "--seconds", "2", "--fixtures", str(fixtures_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"frames sent\s+25\b", out)
    assert re.search(r"model frames received\s+24 \(expected 24\)", out)
    assert re.search(r"frames lost \(must be 0\)\s+0:", out)
    assert re.search(r"client round trip .* median [\d.]+ ms, p99 [\d.]+ ms", out)
    assert re.search(r"server latency \(frame in -> audio sent\)\s+median [\d.]+ ms, p99 [\d.]+ ms", out)
    assert "CPU, this process" in out


def test_server_thread_holds_its_port_before_it_starts(fixtures_dir, tiny_tokenizer_path):
    """No port race: the listening socket is bound when the ServerThread is made, not later by uvicorn."""
    import socket

    from server_harness import load_tiny_models

    from duplex.client.bench_support import ServerThread
    from duplex.server.service import ServerSettings

    server = ServerThread(load_tiny_models(fixtures_dir, tiny_tokenizer_path), ServerSettings(max_sessions=1))
    with socket.socket() as intruder:
        with pytest.raises(OSError):
            intruder.bind(("127.0.0.1", server.port))
    with server:
        assert server.server.started and server.url.endswith(f":{server.port}/api/chat")
