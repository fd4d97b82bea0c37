"""The chat web page end to end in real headless Chromium: streaming, thinking, HTML injection shown as text."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from test_generate import ScriptedLM, script_ids

from tinylm.engine import Engine
from tinylm.server import WEB_DIR, BackgroundServer, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
ATTACK = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'


def test_page_is_self_contained():
    html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # no external scripts/styles/fonts
    assert "@import" not in html and "url(http" not in html
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in html  # model text only goes through textContent


def test_web_chat_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium not installed (apt-get install chromium)")
    from tinylm.tokenizer import load_tokenizer

    tok = load_tokenizer()
    answer = f"Hello **world** 你好🙂 {ATTACK} and `code`."
    script = script_ids(tok, [3, "Thinking about it.", 4, "\n\n" + answer, 2])
    with Engine(ScriptedLM(script, len(tok)), tok, max_batch=2) as engine, \
            BackgroundServer(create_app(engine, "web-test")) as srv, sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        except Exception as e:  # a broken browser install is an environment problem, not a page bug
            pytest.skip(f"cannot launch chromium: {e}")
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/", timeout=20000)
        # Selector waits (not wait_for_function: the page's CSP forbids the eval it uses).
        page.wait_for_selector("#model:has-text('web-test')", timeout=10000)
        page.fill("#system", "You are terse.")
        page.fill("#input", "Hi <b>there</b>")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant .meta:has-text('done')", timeout=20000)
        user_text = page.inner_text(".msg.user .content")
        content = page.locator(".msg.assistant .content")
        assert user_text == "Hi <b>there</b>"  # user input shown as text too
        assert ATTACK in content.inner_text()  # the markup is visible as literal text
        assert page.locator(".msg.assistant .content img, .msg.assistant .content script").count() == 0
        assert page.evaluate("window.__pwned") is None
        assert content.locator("strong").inner_text() == "world" and "你好🙂" in content.inner_text()
        think = page.locator(".msg.assistant details.think")
        assert think.is_visible() and not think.locator(".reasoning").is_visible()  # collapsed by default
        think.locator("summary").click()
        assert think.locator(".reasoning").inner_text() == "Thinking about it."
        # Second turn: the history (with the first answer) is sent again.
        page.fill("#input", "And again?")
        page.click("#send")
        page.wait_for_selector(".msg.assistant >> nth=1 >> .meta:has-text('done')", timeout=20000)
        assert page.locator(".msg").count() == 4
        shot = tmp_path / "web_chat.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("TINYLM_SCREENSHOT"):
            page.screenshot(path=os.environ["TINYLM_SCREENSHOT"], full_page=True)
        assert not errors
        browser.close()
