"""The chat page at `/` in a real browser (Debian's `chromium`, driven by Playwright): the
page's WebSocket is killed mid-answer (the TCP connection reset by a proxy, no close frame) and
the page reconnects, resumes, and shows the full answer exactly once, with TTFT and tokens/s.
Chromium offers permessage-deflate: the page streams with it negotiated."""

from __future__ import annotations

import shutil

import pytest

from conftest import expected_text, metric_value
from resumelib import CuttingProxy


DEFLATE_IN = 'seedance_compression_input_bytes_total{codec="deflate"}'


def chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium not found: scripts/test.sh installs the Debian package")
    return exe


def test_chat_page_resumes_after_its_socket_is_killed(start_server):
    from playwright.sync_api import sync_playwright

    s = start_server("--null-tokens-per-s", "60")
    proxy = CuttingProxy((s.host, s.port))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{proxy.port}/")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('session')")
            extensions = page.evaluate("window.seedance.extensions()")
            compression = page.evaluate("window.seedance.session().compression")
            deflated_before = metric_value(s.metrics(), DEFLATE_IN)
            page.fill("#q", "Tell me a story")
            page.press("#q", "Enter")
            page.wait_for_function("window.seedance.state() && window.seedance.state().last >= 20")
            assert proxy.cut_all() >= 1
            page.wait_for_function("window.seedance.state().done", timeout=30_000)
            answer = page.text_content(".answer")
            resumes = page.evaluate("window.seedance.resumes")
            stats = page.text_content("#stats")
            extensions_after = page.evaluate("window.seedance.extensions()")
            browser.close()
    finally:
        proxy.close()
    assert answer == expected_text(256), answer
    assert resumes >= 1
    assert "TTFT" in stats and "tokens/s" in stats and "length" in stats, stats
    # Chromium's default offer was accepted, on the first connection and on the resumed one, and
    # the answer came deflated.
    answer_ext = "permessage-deflate; client_no_context_takeover"
    assert extensions == extensions_after == answer_ext, (extensions, extensions_after)
    assert compression == "permessage-deflate"
    assert metric_value(s.metrics(), DEFLATE_IN) > deflated_before
