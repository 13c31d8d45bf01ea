"""`duplex serve` flags and `duplex bench serve` (a short run with the tiny models)."""

from __future__ import annotations

import argparse

import pytest

from duplex.server import bench_serve, cli


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_serve_defaults_and_settings():
    args = parse([])
    assert (args.host, args.port, args.ssl, args.log_level) == ("localhost", 8998, None, "info")
    assert args.hf_repo == "kyutai/moshiko-pytorch-bf16"
    settings = cli.settings_from_args(parse(["--max-sessions", "8", "--max-queue", "0",
                                             "--max-session-seconds", "300", "--threads", "2"]))
    assert (settings.max_sessions, settings.max_queue, settings.max_session_seconds, settings.torch_threads) == \
        (8, 0, 300.0, 2)


def test_lag_bounds_and_the_deprecated_grace_flag(caplog):
    settings = cli.settings_from_args(parse(["--max-lag-ms", "250", "--hard-lag-ms", "0"]))
    assert (settings.max_lag_ms, settings.hard_lag_ms) == (250.0, 0.0)
    with caplog.at_level("WARNING"):
        settings = cli.settings_from_args(parse(["--grace-ms", "30"]))
    assert "deprecated" in caplog.text and not hasattr(settings, "grace_ms")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-sessions", "0"], "--max-sessions must be >= 1"),
        (["--max-queue", "-1"], "--max-queue must be >= 0"),
        (["--max-session-seconds", "-5"], "--max-session-seconds must be >= 0"),
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--max-lag-ms", "nan"], "--max-lag-ms must be a finite number >= 0"),
        (["--hard-lag-ms", "-1"], "--hard-lag-ms must be a finite number >= 0"),
    ],
)
def test_bad_serve_flags(argv, message):
    with pytest.raises(ValueError, match=message):
        cli.settings_from_args(parse(argv))


def test_ssl_dir_must_hold_cert_and_key(tmp_path):
    assert cli.ssl_files(None) == (None, None)
    with pytest.raises(ValueError, match="missing .*key.pem"):
        (tmp_path / "cert.pem").write_text("x")
        cli.ssl_files(str(tmp_path))
    (tmp_path / "key.pem").write_text("y")
    assert cli.ssl_files(str(tmp_path)) == (str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))


def test_serve_reports_missing_model_files_in_one_line(tmp_path, capsys):
    args = parse(["--moshi-weight", str(tmp_path / "nope.safetensors"), "--mimi-weight", "x", "--tokenizer", "y",
                  "--config", str(tmp_path / "missing.json")])
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("duplex serve: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bench_serve_prints_the_table(fixtures_dir, capsys):
    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    args = parser.parse_args(["--sessions", "1,2", "--seconds", "1.2", "--compare-steps", "3", "--threads", "1",
                              "--fixtures", str(fixtures_dir), "--jitter", "100"])
    assert bench_serve.main(args) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| N ")]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "1", "2", "2"]  # per N, then per session
    sessions = [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows[2:]]
    assert [(s[1], s[2]) for s in sessions] == [("0", "0"), ("0", "0"), ("1", "100")]  # session, jitter ms
    assert "text = solo" in out and "latency p50/p99 ms" in out
    assert all(s[5] == "0" for s in sessions)  # no user frame dropped
    assert "encode p50/p99" in out and "N x single" in out
    assert "client errors" not in out
