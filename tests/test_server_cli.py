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


def test_min_step_rows_reaches_the_engine(fixtures_dir, tiny_tokenizer_path):
    from server_harness import load_tiny_models

    from duplex.server.service import DuplexService, ServerSettings

    assert cli.settings_from_args(parse([])).min_step_rows is None
    assert cli.settings_from_args(parse(["--min-step-rows", "1"])).min_step_rows == 1
    models = load_tiny_models(fixtures_dir, tiny_tokenizer_path)
    default = DuplexService(models, ServerSettings(max_sessions=3))
    cheapest = DuplexService(models, ServerSettings(max_sessions=3, min_step_rows=1))
    assert default.engine.buckets == (4,) and cheapest.engine.buckets == (1, 2, 3)
    with pytest.raises(ValueError, match="min_step_rows must be >= 1"):
        ServerSettings(min_step_rows=0)


def test_lag_bounds_and_the_deprecated_grace_flag(caplog):
    settings = cli.settings_from_args(parse(["--max-lag-ms", "250", "--hard-lag-ms", "0"]))
    assert (settings.max_lag_ms, settings.hard_lag_ms) == (250.0, 0.0)
    with caplog.at_level("WARNING"):
        settings = cli.settings_from_args(parse(["--grace-ms", "30"]))
    assert "deprecated" in caplog.text and not hasattr(settings, "grace_ms")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-sessions", "0"], "argument --max-sessions: 0 is out of range"),
        (["--max-queue", "-1"], "argument --max-queue: -1 is out of range"),
        (["--max-session-seconds", "-5"], "argument --max-session-seconds: -5.0 is out of range"),
        (["--max-session-seconds", "nan"], "argument --max-session-seconds: 'nan' is not a finite number"),
        (["--max-session-seconds", "inf"], "argument --max-session-seconds: 'inf' is not a finite number"),
        (["--grace-ms=-inf"], "argument --grace-ms: '-inf' is not a finite number"),
        (["--drain-seconds", "NaN"], "argument --drain-seconds: 'NaN' is not a finite number"),
        (["--handshake-seconds", "0"], "argument --handshake-seconds: 0.0 is out of range"),
        (["--port", "70000"], "argument --port: 70000 is out of range"),
        (["--threads", "0"], "argument --threads: 0 is out of range"),
        (["--max-sessions", "two"], "argument --max-sessions: 'two' is not a valid int"),
        (["--max-lag-ms", "nan"], "argument --max-lag-ms: 'nan' is not a finite number"),
        (["--hard-lag-ms", "-1"], "argument --hard-lag-ms: -1.0 is out of range"),
    ],
)
def test_bad_serve_flags_are_refused_with_the_flag_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_settings_refuse_non_finite_values():
    from duplex.server.service import ServerSettings

    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="max_session_seconds must be a finite number"):
            ServerSettings(max_session_seconds=bad)


def test_default_threads_leave_a_core_to_the_event_loop(monkeypatch):
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    assert cli.default_threads() == 1
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 16)
    assert cli.default_threads() == 15
    monkeypatch.setattr(cli.os, "cpu_count", lambda: None)
    assert cli.default_threads() == 1
    assert cli.settings_from_args(parse([])).torch_threads == cli.default_threads()


def test_api_keys_from_flags_and_environment():
    args = parse(["--api-key", "first-key-123", "--api-key", "second-key-45"])
    assert cli.api_keys_from(args, {"DUPLEX_API_KEYS": "env-key-6789, other-key-000"}) == (
        "first-key-123", "second-key-45", "env-key-6789", "other-key-000")
    with pytest.raises(ValueError, match="at least 8 characters"):
        cli.api_keys_from(parse(["--api-key", "short"]), {})


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
