"""The chat web page end to end in real headless Chromium: streaming, settings sent, Stop, New chat,
thinking, HTML injection shown as text, and a CSP without inline scripts."""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
from test_generate import ScriptedLM, script_ids
from test_server import wait_until

from tinylm.inference.engine import Engine
from tinylm.serving.server import WEB_DIR, BackgroundServer, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
ATTACK = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
SLOW_ANSWER = "one two three four five six seven eight nine ten " * 8  # ~80 tokens
STEP_S = 0.05  # per token: the whole slow answer takes ~4 s


def test_page_is_self_contained():
    html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    js = (WEB_DIR / "chat.js").read_text(encoding="utf-8")
    for text in (html, js):
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)  # no external scripts/styles/fonts
        assert "@import" not in text and "url(http" not in text and "fetch(\"http" not in text
        for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in text  # model text only goes through textContent
    assert re.findall(r"<script[^>]*>", html) == ['<script src="chat.js">']  # no inline script (CSP)
    assert re.search(r"<script[^>]*>\s*[^<\s]", html) is None  # ... and no script text inside the tag
    assert re.search(r"<[^>]*\son[a-z]+\s*=", html) is None  # nor inline event handlers


@pytest.fixture(scope="module")
def tok():
    from tinylm.text.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium not installed (apt-get install chromium)")
    p = sync_api.sync_playwright().start()
    try:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    except Exception as e:  # a broken browser install is an environment problem, not a page bug
        p.stop()
        pytest.skip(f"cannot launch chromium: {e}")
    yield b
    b.close()
    p.stop()


def open_page(browser, url: str):
    """A fresh page; returns (page, page errors, JSON bodies of the chat requests it sends)."""
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    errors, bodies = [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: bodies.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") and r.method == "POST" else None)
    resp = page.goto(url + "/", timeout=20000)
    csp = resp.headers["content-security-policy"]
    script_src = re.search(r"script-src([^;]*)", csp).group(1).split()
    assert script_src == ["'self'"], csp  # no 'unsafe-inline': injected inline script could never run
    # Selector waits (not wait_for_function: the page's CSP forbids the eval it uses).
    page.wait_for_selector("#model:not(:has-text('connecting'))", timeout=10000)
    return page, errors, bodies


def test_web_chat_in_chromium(browser, tok, tmp_path):
    answer = f"Hello **world** 你好🙂 {ATTACK} and `code`."
    script = script_ids(tok, [3, "Thinking about it.", 4, "\n\n" + answer, 2])
    with Engine(ScriptedLM(script, len(tok)), tok, max_batch=2) as engine, \
            BackgroundServer(create_app(engine, "web-test")) as srv:
        page, errors, bodies = open_page(browser, srv.url)
        assert "web-test" in page.inner_text("#model")
        page.fill("#system", "You are terse.")
        page.focus("#temperature")
        for _ in range(8):  # the range input, as a user moves it: 0.7 -> 0.3
            page.keyboard.press("ArrowLeft")
        assert page.input_value("#temperature") == "0.3" and page.inner_text("#temperature-value") == "0.3"
        page.fill("#max-tokens", "100")
        page.fill("#input", "Hi <b>there</b>")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant .meta:has-text('done')", timeout=20000)
        # What the page sent: the settings, not just what it shows.
        assert bodies[0]["messages"] == [{"role": "system", "content": "You are terse."},
                                         {"role": "user", "content": "Hi <b>there</b>"}]
        assert bodies[0]["temperature"] == 0.3 and bodies[0]["max_tokens"] == 100
        assert bodies[0]["stream"] is True and bodies[0]["model"] == "web-test"
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
        # Second turn: the history (with the first answer, without its thinking) is sent again.
        page.fill("#input", "And again?")
        page.click("#send")
        page.wait_for_selector(".msg.assistant >> nth=1 >> .meta:has-text('done')", timeout=20000)
        assert page.locator(".msg").count() == 4
        assert bodies[1]["messages"] == bodies[0]["messages"] + [{"role": "assistant", "content": answer},
                                                                 {"role": "user", "content": "And again?"}]
        shot = tmp_path / "web_chat.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("TINYLM_SCREENSHOT"):
            page.screenshot(path=os.environ["TINYLM_SCREENSHOT"], full_page=True)
        assert not errors
        page.close()


def test_streaming_stop_and_new_chat_in_chromium(browser, tok):
    script = script_ids(tok, [SLOW_ANSWER, 2])
    with Engine(ScriptedLM(script, len(tok), delay=STEP_S), tok, max_batch=2) as engine, \
            BackgroundServer(create_app(engine, "slow")) as srv:
        page, errors, bodies = open_page(browser, srv.url)
        page.fill("#max-tokens", "150")
        last = page.locator(".msg.assistant .content").last

        # 1. The answer streams in: several partial renders, each a prefix of the next.
        page.fill("#input", "Count")
        page.keyboard.press("Enter")
        renders: list[str] = []
        deadline = time.time() + 15
        while len(renders) < 3 and time.time() < deadline:
            text = last.inner_text().strip()
            if text and (not renders or text != renders[-1]):
                renders.append(text)
            time.sleep(0.02)
        assert len(renders) >= 3, f"no streaming observed: {renders}"
        assert all(b.startswith(a) for a, b in zip(renders, renders[1:]))

        # 2. Stop: the answer ends where it was, and the server frees the sequence (fetch abort = disconnect).
        assert page.inner_text("#send") == "Stop"
        page.click("#send")
        page.wait_for_selector(".msg.assistant .meta:has-text('stopped by you')", timeout=5000)
        stopped = last.inner_text().strip()
        assert stopped.startswith(renders[-1]) and len(stopped) < len(SLOW_ANSWER.strip())
        assert SLOW_ANSWER.startswith(stopped) and page.inner_text("#send") == "Send"
        assert wait_until(lambda: engine.num_running() == 0, 1.5), "Stop did not free the server's slot"

        # 3. "New chat" during a stream: the old answer must not leak into the new conversation.
        page.fill("#input", "Again")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant >> nth=1 >> .content p", timeout=10000)
        assert bodies[1]["messages"] == [{"role": "user", "content": "Count"},
                                         {"role": "assistant", "content": bodies[1]["messages"][1]["content"]},
                                         {"role": "user", "content": "Again"}]
        assert SLOW_ANSWER.startswith(bodies[1]["messages"][1]["content"].strip())  # the stopped part is kept
        page.click("#new-chat")
        assert page.inner_text("#send") == "Send" and page.locator(".msg").count() == 0
        page.fill("#max-tokens", "5")
        page.fill("#input", "Fresh")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant .meta:has-text('stopped: max tokens')", timeout=10000)
        assert bodies[2]["messages"] == [{"role": "user", "content": "Fresh"}] and bodies[2]["max_tokens"] == 5
        assert page.locator(".msg").count() == 2
        assert page.inner_text(".msg.assistant .content") == "one two three four five"
        page.fill("#input", "More")  # the new history: only this conversation's turns
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.assistant >> nth=1 >> .meta:has-text('stopped: max tokens')", timeout=10000)
        assert [m["content"] for m in bodies[3]["messages"]] == ["Fresh", "one two three four five", "More"]
        assert wait_until(lambda: engine.num_running() == 0, 1.5)
        assert not errors
        page.close()
