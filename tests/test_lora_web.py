"""The web page's settings list the server's adapters (from /api/info) and send the choice as adapter=NAME."""

from __future__ import annotations

import json

import pytest
from web_support import chromium, static_server, write_fake_mic_wav

pytestmark = pytest.mark.timeout(120)

INFO = {"model": "tiny", "sample_rate": 24000, "defaults": {"use_sampling": False}, "adapters": ["support", "pirate"]}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    wav = write_fake_mic_wav(tmp_path_factory.mktemp("mic") / "mic.wav", seconds=1.0)
    with static_server() as base, chromium(wav) as browser:
        yield browser, base


def open_page(site, info):
    browser, base = site
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    tab.route("**/api/info", lambda route: route.fulfill(status=200, content_type="application/json",
                                                         body=json.dumps(info)))
    tab.goto(base)
    tab.wait_for_selector("body[data-ready=true]")
    return context, tab


def query_of(tab) -> str:
    return tab.evaluate("""async () => {
        const ui = await import('./js/ui.js'); const protocol = await import('./js/protocol.js');
        return protocol.samplingQuery(ui.readSettings(document.getElementById('settings-form'))).toString();
    }""")


def test_settings_offer_the_servers_adapters(site):
    context, tab = open_page(site, INFO)
    try:
        tab.click("#settings-button")
        options = tab.eval_on_selector_all("#param-adapter option", "els => els.map(e => [e.value, e.textContent])")
        assert options == [["", "Base model"], ["support", "support"], ["pirate", "pirate"]]
        assert query_of(tab) == ""  # the base model: no parameter
        tab.select_option("#param-adapter", "pirate")
        tab.click("#settings button.primary-button")
        assert query_of(tab) == "adapter=pirate"
        tab.reload()
        tab.wait_for_selector("body[data-ready=true]")
        assert tab.input_value("#param-adapter") == "pirate", "the choice survives a reload"
    finally:
        context.close()


def test_no_adapters_no_field(site):
    context, tab = open_page(site, {k: v for k, v in INFO.items() if k != "adapters"})
    try:
        assert tab.query_selector("#param-adapter") is None
        assert query_of(tab) == ""
    finally:
        context.close()
