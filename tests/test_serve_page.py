"""The chat page in a real headless browser (Debian's chromium, driven by playwright).

Skips cleanly when chromium (`make browser`) or playwright is absent. The screenshot lands in
runs/artifacts/serve_page.png."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.serve_util import start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "runs" / "artifacts"


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium: `make browser` installs Debian's")
async def test_page_streams_tokens(tiny, tmp_path):
    playwright = pytest.importorskip("playwright.async_api")
    srv = start_server(tiny("qwen3_5_moe"), tmp_path / "srv", key=None)
    try:
        async with playwright.async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM,
                                              args=["--no-sandbox", "--disable-gpu"])
            page = await browser.new_page()
            await page.goto(srv.url + "/")
            await page.fill("#max", "16")
            await page.fill("#text", "Hello there")
            await page.click("#send")
            answer = page.locator(".msg.assistant")
            await answer.wait_for()
            await page.wait_for_selector(".msg.assistant[data-done='1']", timeout=60_000)
            text = await answer.inner_text()
            await page.wait_for_function(
                "document.getElementById('batch').textContent !== '–'", timeout=10_000)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "serve_page.png"), full_page=True)
            await browser.close()
        assert text.strip(), "no tokens arrived in the page"
        assert await _no_errors(srv)
    finally:
        assert srv.stop() == 0


async def _no_errors(srv) -> bool:
    done = srv.events("request_done")
    return bool(done) and all(e["status"] == 200 for e in done)
