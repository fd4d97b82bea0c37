"""`tinylm serve` of a vision-language model, through the official `openai` client: image_url parts with
base64 data URLs (non-streaming, streaming, several images per conversation, image and text requests
at once) answer exactly what the VisionLM's own greedy reply is (tinylm/inference/vlm_chat.py), and every
bad image input is a clear 400. Then the web page attaches an image, in headless Chromium."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import pytest
import test_web
from test_vision import make_tower
from test_vlm_engine import png, tiny_vlm
from test_web import open_page

from tinylm.inference.engine import Engine
from tinylm.inference.vlm_chat import reply
from tinylm.serving.server import BackgroundServer, create_app
from tinylm.serving.server_vision import MAX_BODY_BYTES

browser = test_web.browser  # the headless Chromium fixture of the web page's own test

openai = pytest.importorskip("openai")
N_NEW = 8


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def image_part(colour: str) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(png(colour))}}


def ask(colour: str, text: str = "What colour?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, image_part(colour)]}]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(in-memory VisionLM, tokenizer, the same model saved and loaded the way `tinylm serve` loads it)."""
    from tinylm.inference.vlm_engine import load_vlm_for_inference

    d = tmp_path_factory.mktemp("vlm")
    model, tok = tiny_vlm(make_tower(d / "tower"))
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    with pytest.raises(ValueError, match="--lora: not supported for vision-language models"):
        load_vlm_for_inference(str(d / "model"), lora="x")
    served, served_tok = load_vlm_for_inference(str(d / "model"), device="cpu")
    return model, tok, served, served_tok


@pytest.fixture(scope="module")
def server(vlm):
    _, _, served, served_tok = vlm
    with Engine(served, served_tok, max_batch=4) as engine, \
            BackgroundServer(create_app(engine, "vlm-test", max_body_bytes=MAX_BODY_BYTES)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def expected(vlm, messages: list[dict], colours: list[str]) -> str:
    """The VisionLM's own greedy reply (transformers' generate) for `<image>` placeholder messages."""
    model, tok = vlm[0], vlm[1]
    return reply(model, tok, messages, [png(c) for c in colours], max_new_tokens=N_NEW)


def chat(client, messages, **kw):
    return client.chat.completions.create(model="vlm-test", messages=messages, max_tokens=N_NEW, temperature=0, **kw)


def test_image_chat_matches_the_models_own_reply(client, vlm):
    red = expected(vlm, [{"role": "user", "content": "<image>\nWhat colour?"}], ["red"])
    blue = expected(vlm, [{"role": "user", "content": "<image>\nWhat colour?"}], ["blue"])
    assert red != blue  # the image decides the answer, so an ignored image would fail below
    r = chat(client, ask("red"))
    assert r.choices[0].message.content.strip() == red and r.choices[0].finish_reason == "length"
    tpi = vlm[0].settings.tokens_per_image
    assert r.usage.prompt_tokens > tpi and r.usage.completion_tokens == N_NEW
    chunks = list(chat(client, ask("blue"), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == blue
    # several images in one conversation, over two user turns
    convo = ask("red") + [{"role": "assistant", "content": "It is red."}] + ask("green", "And this one?")
    want = expected(vlm, [{"role": "user", "content": "<image>\nWhat colour?"},
                          {"role": "assistant", "content": "It is red."},
                          {"role": "user", "content": "<image>\nAnd this one?"}], ["red", "green"])
    assert chat(client, convo).choices[0].message.content.strip() == want


def test_image_and_text_requests_together(client, vlm):
    from tinylm.inference.generate import SamplingParams, generate

    text = [{"role": "user", "content": "Tell me a story."}]
    ref_text = generate(vlm[0].language_model, vlm[1], [text], SamplingParams(max_new_tokens=N_NEW, temperature=0),
                        chat=True)[0].text
    jobs = [text, ask("red"), ask("blue"), text]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda m: chat(client, m).choices[0].message.content, jobs))
    q = [{"role": "user", "content": "<image>\nWhat colour?"}]
    assert got[0] == got[3] == ref_text  # text requests: exactly the bare LM's answer
    assert [g.strip() for g in got[1:3]] == [expected(vlm, q, ["red"]), expected(vlm, q, ["blue"])]


@pytest.mark.parametrize("url, message", [
    ("https://example.com/cat.png", "remote image URLs are not fetched"),
    ("http://127.0.0.1:1/x.png", "remote image URLs are not fetched"),
    ("file:///etc/passwd", "must be a base64 data URL"),
    ("data:image/png;base64,%%%not-base64", "not valid base64"),
    (data_url(b"hello, not an image"), "not a readable image"),
    (data_url(png("red"), "text/plain"), "is not an image"),
])
def test_bad_image_urls_are_400s(client, url, message):
    part = {"type": "image_url", "image_url": {"url": url}}
    with pytest.raises(openai.BadRequestError, match=message) as e:
        chat(client, [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}])
    assert e.value.body["param"] == "messages[0].content[1].image_url.url"


def test_image_misuse_is_400(client, vlm):
    from test_generate import tiny_model

    from tinylm.text.tokenizer import load_tokenizer

    for messages, message in [
        (ask("red", "look: <image>"), "may not contain <image>"),
        (ask("red", "<|image_pad|>"), "may not contain"),
        ([{"role": "assistant", "content": [image_part("red")]}], "user messages only"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "only text parts .* and image parts"),
    ]:
        with pytest.raises(openai.BadRequestError, match=message):
            chat(client, messages)
    with pytest.raises(openai.BadRequestError, match="'tools' is not supported together with image"):
        chat(client, ask("red"), tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    image_pad_id = vlm[0].settings.image_token_id  # a token-array prompt may name it; without images: 400
    with pytest.raises(openai.BadRequestError, match="1 image-pad tokens .* but 0 image"):
        client.completions.create(model="vlm-test", prompt=[5, image_pad_id, 6], max_tokens=2)
    # text with "<image>" but no image part is plain text to a VLM
    assert chat(client, [{"role": "user", "content": "what is <image>?"}]).choices[0].finish_reason
    tok = load_tokenizer()
    with Engine(tiny_model(len(tok)), tok, max_batch=1) as engine, \
            BackgroundServer(create_app(engine, "text-only")) as srv:
        text_client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="takes no images"):
            text_client.chat.completions.create(model="text-only", messages=ask("red"), max_tokens=2)


def test_web_page_attaches_an_image(browser, server, vlm, tmp_path):
    (tmp_path / "red.png").write_bytes(png("red"))
    page, errors, bodies = open_page(browser, server.url)
    page.fill("#max-tokens", str(N_NEW))
    page.focus("#temperature")
    page.keyboard.press("Home")  # the range input's minimum: greedy
    page.set_input_files("#image-file", str(tmp_path / "red.png"))
    page.wait_for_selector("#attachments img")
    page.fill("#input", "What colour?")
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant .meta:has-text('max tokens')", timeout=20000)
    sent = bodies[0]["messages"][-1]["content"]
    assert sent == [{"type": "text", "text": "What colour?"},
                    {"type": "image_url", "image_url": {"url": data_url(png("red"))}}]  # the file's own bytes
    assert bodies[0]["temperature"] == 0
    answer = page.inner_text(".msg.assistant .content").strip()
    assert answer == expected(vlm, [{"role": "user", "content": "<image>\nWhat colour?"}], ["red"])
    assert page.locator(".msg.user .bubble img").count() == 1 and page.locator("#attachments").is_hidden()
    page.fill("#input", "And now?")  # the next turn sends the image again, inside the history
    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant >> nth=1 >> .meta:has-text('max tokens')", timeout=20000)
    assert bodies[1]["messages"][0]["content"] == sent and bodies[1]["messages"][-1]["content"] == "And now?"
    assert not errors
    page.close()


def test_tinylm_serve_of_a_vlm_directory(vlm, tmp_path):
    """`tinylm serve VLM_DIR` end to end in this process (engine in the main thread, as the command runs it):
    it loads the VLM and takes a base64 image larger than the 1 MiB text-request body limit."""
    import io
    import os
    import signal
    import threading
    import time

    import httpx
    import numpy as np
    from PIL import Image

    from tinylm.cli import main
    from tinylm.serving.server import free_port

    model, tok = vlm[0], vlm[1]
    model.save_pretrained(tmp_path / "vlm")
    tok.save_pretrained(tmp_path / "vlm")
    buf = io.BytesIO()  # noise does not compress: ~1.9 MB of PNG, ~2.6 MB as base64
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)).save(buf, format="PNG")
    big = buf.getvalue()
    port, answers, up = free_port(), [], []

    def client() -> None:
        deadline = time.time() + 60
        while not up and time.time() < deadline:
            try:
                up.append(httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code)
            except httpx.HTTPError:
                time.sleep(0.1)
        if not up:  # the server never came up: `main` returns by itself
            return
        try:
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
            msgs = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                 {"type": "image_url", "image_url": {"url": data_url(big)}}]}]
            answers.append(c.chat.completions.create(model="vlm", messages=msgs, max_tokens=N_NEW, temperature=0))
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # what stops `tinylm serve` (Ctrl-C / SIGTERM), once it runs

    threading.Thread(target=client, daemon=True).start()
    assert main(["serve", str(tmp_path / "vlm"), "--port", str(port)]) == 0
    assert len(data_url(big)) > 1 << 21 and answers
    want = reply(model, tok, [{"role": "user", "content": "<image>\nWhat is it?"}], [big], max_new_tokens=N_NEW)
    assert answers[0].choices[0].message.content.strip() == want
