"""The page itself in headless Chromium, served statically (no duplex server): settings drawer by keyboard,
validation and persistence, a failed connection reported, phone layout, accessible names."""

from __future__ import annotations

import json

import pytest
from web_support import chromium, static_server, write_fake_mic_wav

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    wav = write_fake_mic_wav(tmp_path_factory.mktemp("mic") / "mic.wav", seconds=1.0)
    with static_server() as base, chromium(wav) as browser:
        yield browser, base


@pytest.fixture
def page(site):
    browser, base = site
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.goto(base)
    tab.wait_for_selector("body[data-ready=true]")
    yield tab
    context.close()
    assert not errors, f"page errors: {errors}"


def test_settings_drawer_by_keyboard_with_validation_and_persistence(page):
    page.focus("#settings-button")
    page.keyboard.press("Enter")
    assert page.is_visible("#settings[open]")
    assert page.evaluate("document.activeElement.closest('dialog') !== null"), "focus moves into the drawer"

    page.fill("#param-text_topk", "2.5")
    page.click("#settings button.primary-button")
    assert page.is_visible("#settings[open]"), "an invalid value keeps the drawer open"
    assert page.text_content("#settings-error") == "Text top-k must be a whole number"

    page.fill("#param-text_topk", "30")
    page.fill("#param-audio_seed", "1234")
    page.click("#settings button.primary-button")
    assert not page.is_visible("#settings[open]")
    stored = json.loads(page.evaluate("localStorage.getItem('duplex.sampling')"))
    assert stored["text_topk"] == "30" and stored["audio_seed"] == "1234"

    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#param-text_topk") == "30", "settings survive a reload"
    page.focus("#settings-button")
    page.keyboard.press("Enter")
    page.keyboard.press("Escape")
    assert not page.is_visible("#settings[open]")
    page.evaluate("localStorage.clear()")


def test_invalid_stored_setting_stops_the_call_with_a_message(page):
    page.evaluate("localStorage.setItem('duplex.sampling', JSON.stringify({text_temperature: '99'}))")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.click("#call-button")
    assert "Text temperature must be between 0 and 5" in page.text_content("#message")
    assert page.evaluate("window.duplexCall === undefined"), "no call was attempted"
    page.evaluate("localStorage.clear()")


def test_a_failed_connection_is_reported(page):
    # the static server has no /api/chat: the websocket handshake fails
    assert page.text_content("#model-info") == "Model information unavailable"
    page.click("#call-button")
    page.wait_for_function("window.duplexStats && window.duplexStats.state === 'ended'", timeout=20_000)
    assert page.text_content("#message").startswith("Could not connect to the server")
    assert page.text_content("#status-text") == "Call failed"
    assert page.get_attribute("#status-dot", "data-state") == "error"
    assert page.is_disabled("#download-audio")


def test_phone_layout_fits_the_screen(page):
    page.set_viewport_size({"width": 375, "height": 740})
    page.wait_for_timeout(100)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375, "no sideways scrolling"
    button = page.locator("#call-button").bounding_box()
    assert button["y"] + button["height"] < 740, "the call button is on the first screen"
    transcript = page.locator("#transcript").bounding_box()
    assert transcript["y"] > button["y"], "the transcript stacks below the call panel"


def test_every_control_has_an_accessible_name(page):
    unnamed = page.evaluate("""() => [...document.querySelectorAll('button, input, [role=meter]')]
        .filter((el) => !(el.getAttribute('aria-label') || el.labels?.length || el.getAttribute('aria-labelledby')
                         || el.textContent.trim()))
        .map((el) => el.outerHTML.slice(0, 80))""")
    assert unnamed == []
    assert page.get_attribute("#transcript", "role") == "log"
    assert page.get_attribute("#transcript", "aria-live") == "polite"
    assert page.get_attribute("#message", "role") == "alert"
