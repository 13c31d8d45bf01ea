"""`duplex bench server` smoke run: a short real-time stream to the in-process tiny server."""

from __future__ import annotations

import re

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
