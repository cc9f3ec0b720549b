"""The playground page at `/`, in a real headless browser (Debian's chromium, driven by
Playwright's Python API): it asks for the API key, lists the served model, streams a chat
answer equal to the engine's own, and Stop aborts a request (the server counts it aborted
and frees its KV blocks)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import pytest

from engine import SamplingParams
from live_server import start_server, stop_server
from test_hostile import MODEL
from test_server import metric

pytestmark = pytest.mark.slow
KEY = "sk-playground"
SYSTEM = "You are a helpful assistant."  # the page's default system prompt
# As this workplace's notes advise for a closed network: no background connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def chromium() -> str:
    """Debian's chromium, installed here if missing (CI machines start without it)."""
    path = shutil.which("chromium")
    if path is None and os.geteuid() == 0:
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive "
                       "apt-get install -y -qq chromium", shell=True, check=True, timeout=900,
                       capture_output=True)
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("Debian's chromium is not installed (and this user cannot apt-get it)")
    return path


@pytest.fixture(scope="module")
def live(smol_llm, tmp_path_factory):
    proc, base, _, _ = start_server(tmp_path_factory.mktemp("playground"), "playground",
                                    "--api-key", KEY)
    yield base
    stop_server(proc)


def aborted(base: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith('kvserve_requests_total{outcome="aborted",protocol="openai"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_playground_streams_and_stops(live, smol_llm, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    exe = chromium()
    question = "What is the capital of France?"
    expected = smol_llm.chat([{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": question}],
                             SamplingParams(temperature=0.0, max_tokens=12),
                             use_tqdm=False)[0].outputs[0].text
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        page.goto(live + "/")
        expect(page.locator("#keyrow")).to_be_visible()  # /v1/models said 401
        page.fill("#apikey", KEY)
        page.dispatch_event("#apikey", "change")
        expect(page.locator("#model")).to_have_value(MODEL)
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "12")
        page.fill("#prompt", question)
        page.press("#prompt", "Enter")
        expect(page.locator("#send")).to_be_enabled(timeout=60_000)
        assert page.locator(".msg.assistant span").last.inner_text() == expected.strip()
        expect(page.locator("#stats")).to_contain_text("TTFT")

        before = aborted(live)
        page.fill("#max_tokens", "1000")
        page.fill("#prompt", "Count from 1 to 1000, one number per line.")
        page.press("#prompt", "Enter")
        page.wait_for_function(
            "document.querySelectorAll('.msg.assistant span')[1]?.textContent.length > 20",
            timeout=60_000)
        page.click("#stop")
        expect(page.locator("#send")).to_be_enabled(timeout=10_000)
        shot = os.environ.get("KVSERVE_PLAYGROUND_SCREENSHOT", str(tmp_path / "playground.png"))
        page.screenshot(path=shot)
        browser.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (aborted(live) == before
                                           or metric(live, "kvserve_kv_cache_blocks_in_use")):
        time.sleep(0.1)
    assert aborted(live) == before + 1
    assert metric(live, "kvserve_num_requests_running") == 0
    assert metric(live, "kvserve_kv_cache_blocks_in_use") == 0
