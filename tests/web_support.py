"""Helpers for the browser tests: Debian's Chromium driven by Playwright, a fake microphone, a static server."""

from __future__ import annotations

import functools
import http.server
import re
import threading
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WEB_ROOT = REPO / "client" / "web"
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "artifacts"


def chromium_args(fake_mic_wav: Path) -> list[str]:
    """Flags for a headless Chromium with a fake microphone that plays `fake_mic_wav` in a loop."""
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_mic_wav}",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]


def write_fake_mic_wav(path: Path, seconds: float = 4.0, rate: int = 48000) -> Path:
    """A speech-like test signal: a gliding harmonic tone, syllable-rate amplitude modulation, 48 kHz 16-bit."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 140 + 60 * np.sin(2 * np.pi * 0.7 * t)  # gliding pitch, Hz
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 3.0 * t)) ** 2 / 4
    signal = 0.35 * voice * envelope
    pcm = np.clip(signal * 32767, -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


@contextmanager
def static_server(root: Path = WEB_ROOT) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 (a secure context for the browser); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def chromium(fake_mic_wav: Path):
    """A Playwright Browser on /usr/bin/chromium (never a downloaded browser)."""
    if not CHROMIUM.exists():
        pytest.fail("Chromium is required for the browser tests: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=chromium_args(fake_mic_wav))
        try:
            yield browser
        finally:
            browser.close()


def dominant_frequency(samples: np.ndarray, rate: int) -> float:
    """Frequency (Hz) of the strongest bin of a Hann-windowed spectrum."""
    windowed = samples * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(windowed))
    return float(np.argmax(spectrum) * rate / len(samples))


def ogg_crc32(data: bytes) -> int:
    """Ogg's CRC-32 (poly 0x04c11db7, MSB first, init 0, no final xor), written independently of the page's JS."""
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
            crc &= 0xFFFFFFFF
    return crc


def split_ogg_pages(data: bytes) -> list[dict]:
    """Parse a byte string into Ogg pages: flags, granule, serial, sequence, crc_ok, packets (whole-page only)."""
    pages = []
    at = 0
    while at < len(data):
        assert data[at:at + 4] == b"OggS", f"no Ogg capture pattern at byte {at}"
        segments = data[at + 26]
        lacing = data[at + 27:at + 27 + segments]
        length = 27 + segments + sum(lacing)
        raw = bytearray(data[at:at + length])
        crc = int.from_bytes(raw[22:26], "little")
        raw[22:26] = b"\0\0\0\0"
        body = bytes(raw[27 + segments:])
        packets, start, size = [], 0, 0
        for value in lacing:
            size += value
            if value < 255:
                packets.append(body[start:start + size])
                start += size
                size = 0
        pages.append({
            "flags": raw[5],
            "granule": int.from_bytes(raw[6:14], "little", signed=True),
            "serial": int.from_bytes(raw[14:18], "little"),
            "sequence": int.from_bytes(raw[18:22], "little"),
            "crc_ok": ogg_crc32(bytes(raw)) == crc,
            "packets": packets,
        })
        at += length
    return pages


def self_signed_certificate(directory: Path) -> Path:
    """cert.pem + key.pem for 127.0.0.1/localhost (what `duplex serve --ssl DIR` reads), made with openssl."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.fail("openssl is required to make the https test's certificate: apt-get install -y openssl")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")],
        check=True, capture_output=True,
    )
    return directory


def tiny_serve_args(fixtures: Path, tokenizer: Path) -> list[str]:
    """`duplex serve` model flags for the tiny fixture models."""
    return [
        "--moshi-weight", str(fixtures / "lm_tiny" / "model.safetensors"),
        "--config", str(fixtures / "lm_tiny" / "config.json"),
        "--mimi-weight", str(fixtures / "mimi_tiny" / "model.safetensors"),
        "--mimi-config", str(fixtures / "mimi_tiny" / "config.json"),
        "--tokenizer", str(tokenizer),
        "--device", "cpu",
    ]


@contextmanager
def duplex_serve(args: list[str], log_path: Path, startup_timeout: float = 90.0) -> Iterator[str]:
    """Run `duplex serve ARGS --host 127.0.0.1 --port P` in a subprocess; yields its base URL (https with --ssl)."""
    import os
    import ssl
    import subprocess
    import sys
    import time
    import urllib.request

    scheme = "https" if "--ssl" in args else "http"
    unverified = ssl._create_unverified_context()  # the tests' certificate is self-signed

    # --port 0: the server binds a free port itself (no race with other processes) and logs it.
    command = [sys.executable, "-c", "import sys; from duplex.cli import main; sys.exit(main())",
               "serve", *args, "--host", "127.0.0.1", "--port", "0"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            deadline = time.monotonic() + startup_timeout
            base = None
            while True:
                if process.poll() is not None:
                    pytest.fail(f"duplex serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
                if base is None:
                    found = re.search(r"duplex listening on \S+ port (\d+)", log_path.read_text(errors="replace"))
                    base = f"{scheme}://127.0.0.1:{found.group(1)}/" if found else None
                try:
                    if base is None:
                        raise OSError("port not announced yet")
                    with urllib.request.urlopen(base + "healthz", timeout=2, context=unverified) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"duplex serve did not become healthy:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def read_metrics(base: str) -> dict[str, float]:
    """The server's Prometheus metrics as {'name{labels}': value}."""
    import urllib.request

    with urllib.request.urlopen(base + "metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
