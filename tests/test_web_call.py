"""A real call from headless Chromium (fake microphone) to `duplex serve` with the tiny fixture models:
audio out and decoded by the server, audio back and played, transcript, statistics, downloads, hang-up;
queue position, the "busy" error of a third caller, and https/wss with --ssl."""

from __future__ import annotations

import io
import os
import re
import shutil
import time
import wave
from pathlib import Path

import numpy as np
import pytest
from web_support import (
    ARTIFACTS,
    REPO,
    chromium,
    duplex_serve,
    read_metrics,
    self_signed_certificate,
    tiny_serve_args,
    write_fake_mic_wav,
)

pytestmark = pytest.mark.timeout(240)

LIVE_TIMEOUT_MS = 30_000
# A hang-up frees the slot once the server has stepped the audio already sent; on a loaded CPU that lags.
HANDOVER_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def server(fixtures_dir, tiny_tokenizer_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = tiny_serve_args(fixtures_dir, tiny_tokenizer_path) + ["--max-sessions", "1", "--max-queue", "1"]
    with duplex_serve(args, log) as base:
        yield base


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    wav = write_fake_mic_wav(tmp_path_factory.mktemp("mic") / "mic.wav")
    with chromium(wav) as instance:
        yield instance


def open_page(browser, base, errors, bypass_csp=True):
    # ignore_https_errors: the https test's certificate is self-signed. bypass_csp: Playwright's
    # wait_for_function evaluates strings, which the page's CSP (no 'unsafe-eval') forbids; the CSP tests
    # below run the page under its real policy with selector-based waits only.
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True,
                                  ignore_https_errors=True, bypass_csp=bypass_csp)
    page = context.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(base)
    page.wait_for_selector("body[data-ready=true]")
    return page


def wait_for_server(base, predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        metrics = read_metrics(base)
        if predicate(metrics):
            return metrics
        if time.monotonic() > deadline:
            raise AssertionError(f"server metrics never matched: { {k: v for k, v in metrics.items() if 'bucket' not in k} }")
        time.sleep(0.2)


def layout_boxes(page):
    """Where the main controls sit; a call must not make them jump."""
    page.mouse.move(1, 1)  # no hover lift on the call button
    page.wait_for_timeout(250)
    return {sel: page.locator(sel).bounding_box() for sel in ("#call-button", "#stats", "#transcript", ".meters")}


def wait_for_stats(page, condition: str, timeout_ms: int) -> None:
    """Wait until `condition` (JS over `s` = window.duplexStats) holds; on timeout show the stats."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"(s => Boolean(s) && ({condition}))(window.duplexStats)", timeout=timeout_ms)
    except PlaywrightTimeout:
        raise AssertionError(f"page never reached {condition!r}; stats: {stats(page)}") from None


def stats(page):
    return page.evaluate("window.duplexStats")


def test_a_call_streams_both_ways_and_hangs_up(server, browser):
    errors: list[str] = []
    page = open_page(browser, server, errors)
    assert "lm_tiny" in page.text_content("#model-info")
    before = read_metrics(server)
    boxes_idle = layout_boxes(page)

    page.click("#call-button")
    wait_for_stats(page, "s.state === 'live'", timeout_ms=LIVE_TIMEOUT_MS)
    assert page.text_content("#call-label") == "End call"
    # the worklet played real model audio, the page decoded Opus pages, and the transcript has text
    wait_for_stats(page, "s.playedSamples > 12000 && s.packetsDecoded >= 10 && s.transcriptChars > 0 && s.roundTripMs > 0",
                   timeout_ms=60_000)
    first = stats(page)
    assert layout_boxes(page) == boxes_idle, "starting a call must not move the layout"
    page.wait_for_timeout(1200)
    later = stats(page)

    # server side: Opus in was decoded into stepped frames, model audio went out, one session is active
    metrics = wait_for_server(server, lambda m: m["duplex_frames_in_total"] - before["duplex_frames_in_total"] >= 10)
    assert metrics["duplex_frames_out_total"] > before["duplex_frames_out_total"]
    assert metrics['duplex_bytes_total{direction="in"}'] > before['duplex_bytes_total{direction="in"}'] + 2000
    assert metrics["duplex_active_sessions"] == 1

    # page side: statistics move while the call runs
    assert later["samplesSent"] > first["samplesSent"] and later["audioPagesOut"] > first["audioPagesOut"]
    assert later["bytesIn"] > 0 and later["kbpsOut"] > 16 and later["crcErrors"] == 0
    assert isinstance(later["underruns"], int) and later["bufferedMs"] >= 0
    assert page.text_content("#stat-rtt").endswith(" ms")
    assert page.text_content("#stat-out").endswith("kbit/s")
    assert int(page.get_attribute("#mic-meter", "aria-valuenow")) > 0
    transcript = page.text_content("#transcript .turn p")
    assert re.search(r"w\d+[a-z]", transcript), f"tiny-tokenizer words expected in {transcript!r}"
    assert "text: greedy" in page.text_content("#session-info")
    assert "audio: greedy" in page.text_content("#session-info")

    save_screenshot(page)

    assert page.is_enabled("#mute-button")
    page.click("#mute-button")
    page.wait_for_timeout(800)
    assert page.get_attribute("#mute-button", "aria-pressed") == "true" and stats(page)["muted"] is True
    assert int(page.get_attribute("#mic-meter", "aria-valuenow")) <= 2, "muted: the meter falls to zero"

    page.click("#call-button")
    wait_for_stats(page, "s.state === 'ended'", timeout_ms=10_000)
    assert page.text_content("#status-text") == "Call ended"
    assert page.is_disabled("#mute-button") and page.get_attribute("#mute-button", "aria-pressed") == "false"
    assert layout_boxes(page) == boxes_idle, "ending a call must not move the layout"
    wait_for_server(server, lambda m: m["duplex_active_sessions"] == 0
                    and m.get('duplex_sessions_ended_total{reason="client_closed"}', 0) >= 1,
                    timeout=HANDOVER_TIMEOUT_MS / 1000)

    check_downloads(page, transcript)
    assert not errors, f"page errors: {errors}"
    page.context.close()


def save_screenshot(page):
    """artifacts/web_call.png on every run; docs/web_call.png (the README's) when missing or when
    DUPLEX_UPDATE_SCREENSHOTS=1, so that test runs do not rewrite a tracked file."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_call.png"))
    docs_copy = REPO / "docs" / "web_call.png"
    if not docs_copy.exists() or os.environ.get("DUPLEX_UPDATE_SCREENSHOTS") == "1":
        docs_copy.parent.mkdir(exist_ok=True)
        shutil.copyfile(ARTIFACTS / "web_call.png", docs_copy)


def check_downloads(page, transcript):
    with page.expect_download() as info:
        page.click("#download-audio")
    with wave.open(io.BytesIO(Path(info.value.path()).read_bytes())) as wav:
        assert (wav.getnchannels(), wav.getframerate(), wav.getsampwidth()) == (2, 24000, 2)
        audio = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").reshape(-1, 2) / 32768.0
    assert len(audio) > 24000, "more than a second of conversation"
    user_rms, model_rms = np.sqrt(np.mean(audio ** 2, axis=0))
    assert user_rms > 0.01, "left channel: the fake microphone's signal"
    assert model_rms > 1e-4, "right channel: the model's audio as played"
    with page.expect_download() as info:
        page.click("#download-transcript")
    text = Path(info.value.path()).read_text(encoding="utf-8")
    assert info.value.suggested_filename.endswith(".txt")
    assert transcript.strip()[:40] in text


def test_queue_position_then_busy_then_the_queued_caller_gets_the_slot(server, browser):
    """--max-sessions 1 --max-queue 1: caller 2 waits (position shown), caller 3 is refused with "busy"."""
    errors: list[str] = []
    first = open_page(browser, server, errors)
    first.focus("#call-button")
    first.keyboard.press("Enter")  # keyboard works as well as a click
    wait_for_stats(first, "s.state === 'live'", timeout_ms=LIVE_TIMEOUT_MS)

    second = open_page(browser, server, errors)
    second.click("#call-button")
    second.wait_for_function("document.getElementById('status-text').textContent.includes('queue')",
                             timeout=LIVE_TIMEOUT_MS)
    assert "number 1 in the queue" in second.text_content("#status-text")
    assert second.text_content("#call-label") == "End call", "a queued caller can leave the queue"

    third = open_page(browser, server, errors)
    third.click("#call-button")
    wait_for_stats(third, "s.state === 'ended'", timeout_ms=LIVE_TIMEOUT_MS)
    message = third.text_content("#message")
    assert "busy" in message, message
    assert third.get_attribute("#message", "data-tone") == "error"
    assert third.text_content("#status-text") == "Call failed"
    assert third.text_content("#call-label") == "Start call"
    assert read_metrics(server).get('duplex_rejected_total{reason="busy"}', 0) >= 1

    first.click("#call-button")
    wait_for_stats(second, "s.state === 'live'", timeout_ms=HANDOVER_TIMEOUT_MS)
    second.click("#call-button")
    wait_for_stats(second, "s.state === 'ended'", timeout_ms=10_000)
    wait_for_server(server, lambda m: m["duplex_active_sessions"] == 0, timeout=HANDOVER_TIMEOUT_MS / 1000)
    assert not errors, f"page errors: {errors}"


def test_https_with_ssl_gives_a_secure_context_and_a_wss_call(browser, fixtures_dir, tiny_tokenizer_path, tmp_path):
    """`duplex serve --ssl DIR`: the page is a secure context (microphone allowed off localhost) and talks wss."""
    certs = self_signed_certificate(tmp_path)
    args = tiny_serve_args(fixtures_dir, tiny_tokenizer_path) + ["--ssl", str(certs), "--max-sessions", "1"]
    with duplex_serve(args, tmp_path / "serve.log") as base:
        assert base.startswith("https://")
        errors: list[str] = []
        page = open_page(browser, base, errors)
        assert page.evaluate("window.isSecureContext && location.protocol") == "https:"
        assert page.text_content("#message") == "", "no insecure-context warning"
        page.click("#call-button")
        wait_for_stats(page, "s.state === 'live'", timeout_ms=LIVE_TIMEOUT_MS)
        assert page.evaluate("window.duplexCall.url").startswith("wss://127.0.0.1:")
        wait_for_stats(page, "s.packetsDecoded > 0 && s.playedSamples > 0", timeout_ms=60_000)
        page.click("#call-button")
        wait_for_stats(page, "s.state === 'ended'", timeout_ms=10_000)
        page.context.close()
        assert not errors, f"page errors: {errors}"


def csp_console(page) -> list[str]:
    messages: list[str] = []
    page.on("console", lambda message: messages.append(message.text)
            if "Content Security Policy" in message.text else None)
    return messages


def call_and_hang_up(page) -> None:
    page.click("#call-button")
    page.wait_for_selector('#status-dot[data-state="live"]', timeout=LIVE_TIMEOUT_MS)
    page.wait_for_timeout(1500)
    page.click("#call-button")
    page.wait_for_selector('#call-button[data-state="idle"]', timeout=HANDOVER_TIMEOUT_MS)


def test_the_page_makes_a_call_under_its_content_security_policy(server, browser):
    errors: list[str] = []
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    violations = csp_console(page)
    page.on("pageerror", lambda error: errors.append(str(error)))
    response = page.goto(server)
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    page.wait_for_selector("body[data-ready=true]")
    call_and_hang_up(page)
    context.close()
    assert violations == [] and errors == []


def test_the_page_asks_for_the_api_key_and_calls_with_it(fixtures_dir, tiny_tokenizer_path, browser, tmp_path):
    key = "browser-key-0123456789"
    args = tiny_serve_args(fixtures_dir, tiny_tokenizer_path) + ["--max-sessions", "1", "--api-key", key]
    with duplex_serve(args, tmp_path / "serve.log") as base:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        violations = csp_console(page)
        page.goto(base)
        page.wait_for_selector("#key-form:not([hidden])")
        assert "needs an API key" in page.inner_text("#model-info")
        page.fill("#key-input", "wrong-key-000000000")
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#key-error:has-text('refused')")
        page.fill("#key-input", key)
        page.click("#key-form button[type=submit]")
        page.wait_for_selector("#key-form", state="hidden")
        page.wait_for_selector("#model-info:has-text('tiny')")
        call_and_hang_up(page)
        context.close()
    assert violations == []
