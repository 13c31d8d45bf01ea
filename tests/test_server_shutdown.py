"""`duplex serve` as a real process: SIGTERM / SIGINT during a session tells the client and exits 0."""

from __future__ import annotations

import asyncio
import signal
import subprocess

import pytest
from server_harness import spawn_serve, synth_audio

from duplex.client.client import DuplexClient, ErrorEvent


def start_server(fixtures_dir, tokenizer, *extra: str) -> tuple[subprocess.Popen, int, list[str]]:
    """`duplex serve` with the tiny models on any free port; returns the process, its port, its log lines."""
    argv = ["--host", "127.0.0.1", "--port", "0",
            "--moshi-weight", str(fixtures_dir / "lm_tiny/model.safetensors"),
            "--config", str(fixtures_dir / "lm_tiny/config.json"),
            "--mimi-weight", str(fixtures_dir / "mimi_tiny/model.safetensors"),
            "--mimi-config", str(fixtures_dir / "mimi_tiny/config.json"),
            "--tokenizer", str(tokenizer), "--device", "cpu", "--threads", "1", "--max-sessions", "1", *extra]
    return spawn_serve(*argv)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_session_tells_the_client_and_exits_0(fixtures_dir, tiny_tokenizer_path, sig):
    """With --drain-seconds 0 the first signal ends the calls at once (the drain has its own tests)."""
    process, port, lines = start_server(fixtures_dir, tiny_tokenizer_path, "--drain-seconds", "0")
    try:
        async def main():
            client = await DuplexClient.connect(f"ws://127.0.0.1:{port}/api/chat", timeout=20)
            await client.send_pcm(synth_audio(6, 1))
            events = []
            async with asyncio.timeout(30):
                async for event in client:
                    events.append(event)
                    if len(events) == 1:
                        process.send_signal(sig)  # mid-session: the client is streaming
            return events

        events = asyncio.run(main())
        code = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert isinstance(events[-1], ErrorEvent) and events[-1].message == "server shutting down", events[-3:]
    assert code == 0, "".join(lines)
    assert "Traceback" not in "".join(lines)
