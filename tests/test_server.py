"""The OpenAI-compatible server, tested with the official `openai` client, and the batching engine."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from test_generate import ScriptedLM, script_ids, tiny_model

from tinylm.engine import Engine, QueueFull
from tinylm.generate import SamplingParams, generate, render_chat
from tinylm.server import BackgroundServer, create_app

openai = pytest.importorskip("openai")
KEY = "sk-test-key"
MSGS = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def tok():
    from tinylm.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok))


@pytest.fixture(scope="module")
def server(model, tok):
    engine = Engine(model, tok, max_batch=4, max_queue=8).start()
    max_running = []
    step = engine.gen.step

    def counting_step():  # record how many sequences each decode step served
        max_running.append(len(engine.gen.running) + min(len(engine.gen.waiting), len(engine.gen.free_rows)))
        step()

    engine.gen.step = counting_step
    app = create_app(engine, "tiny-test", api_key=KEY, max_tokens_cap=512, max_body_bytes=64 * 1024)
    with BackgroundServer(app) as srv:
        srv.engine, srv.max_running = engine, max_running
        yield srv
    engine.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(model, tok, messages, n):
    return generate(model, tok, [messages], SamplingParams(max_new_tokens=n, temperature=0), chat=True)[0]


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-test"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny-test" and h["auth"] is True


def test_chat_completion_and_stream(client, model, tok):
    ref = reference(model, tok, MSGS, 16)
    r = client.chat.completions.create(model="tiny-test", messages=MSGS, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ("length" if len(ref.token_ids) == 16 else "stop")
    assert r.usage.prompt_tokens == len(render_chat(tok, MSGS)) and r.usage.completion_tokens == len(ref.token_ids)

    chunks = list(client.chat.completions.create(model="tiny-test", messages=MSGS, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [r.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_completions_and_stream(client, model, tok):
    ref = generate(model, tok, ["Once upon a time"], SamplingParams(max_new_tokens=10, temperature=0))[0]
    r = client.completions.create(model="tiny-test", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    s = client.completions.create(model="tiny-test", prompt="Once upon a time", max_tokens=10, temperature=0,
                                  stream=True)
    assert "".join(c.choices[0].text for c in s) == ref.text
    two = client.completions.create(model="tiny-test", prompt=["a", "b"], max_tokens=3, temperature=0, n=2)
    assert len(two.choices) == 4 and two.choices[0].text == two.choices[1].text  # greedy: n copies agree


def test_error_shapes(client, server):
    def check(exc_type, status, **kw):
        args = {"model": "tiny-test", "messages": MSGS, "max_tokens": 4, **kw}
        with pytest.raises(exc_type) as e:
            client.chat.completions.create(**args)
        assert e.value.status_code == status
        assert set(e.value.body) == {"message", "type", "param", "code"}  # the client unwraps {"error": ...}
        return e.value.body

    assert check(openai.NotFoundError, 404, model="gpt-9")["code"] == "model_not_found"
    assert check(openai.BadRequestError, 400, temperature=7)["param"] == "temperature"
    assert check(openai.BadRequestError, 400, max_tokens=100000)["param"] == "max_tokens"
    long = [{"role": "user", "content": "word " * 230}]
    assert check(openai.BadRequestError, 400, messages=long, max_tokens=100)["code"] == "context_length_exceeded"
    assert check(openai.BadRequestError, 400, messages=[{"role": "wizard", "content": "x"}])["param"] == "messages[0].role"
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.models.list()
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"[1, 2]", headers=h)
    assert r.status_code == 400
    r = httpx.post(server.url + "/v1/chat/completions", content=b"x" * 70000, headers=h)
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSGS})
    assert r.status_code == 401
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["type"] == "not_found_error"


def test_concurrent_requests_match_sequential(client, server, model, tok):
    convos = [[{"role": "user", "content": f"Question number {i}: {'why ' * i}?"}] for i in range(6)]
    refs = [reference(model, tok, c, 12).text for c in convos]
    results: dict[int, str] = {}
    server.max_running.clear()

    def ask(i: int) -> None:
        r = client.chat.completions.create(model="tiny-test", messages=convos[i], max_tokens=12, temperature=0)
        results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results.get(i) for i in range(6)] == refs
    assert max(server.max_running) > 1, "requests should have been decoded together"


def test_disconnect_frees_the_sequence(server):
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": MSGS, "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=h, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # client goes away mid-answer
    deadline = time.time() + 20
    while server.engine.num_running() and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.num_running() == 0
    assert len(server.engine.gen.free_rows) == 4


def test_queue_bound(model, tok):
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    ids = render_chat(tok, MSGS)
    with Engine(model, tok, max_batch=1, max_queue=1) as engine:
        seqs = [engine.submit(ids, long, lambda d: None), engine.submit(ids, long, lambda d: None)]
        with pytest.raises(QueueFull):
            engine.submit(ids, long, lambda d: None)
        app = create_app(engine, "m")
        with BackgroundServer(app) as srv:
            r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 4}, timeout=30)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        for s in seqs:
            engine.cancel(s)


def test_reasoning_content(tok):
    script = script_ids(tok, [3, "First, think.", 4, "\n\nAnswer: 42", 2])
    with Engine(ScriptedLM(script, len(tok)), tok, max_batch=2) as engine:
        with BackgroundServer(create_app(engine, "thinker")) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)
            r = c.chat.completions.create(model="thinker", messages=MSGS)
            assert r.choices[0].message.content == "Answer: 42"
            assert r.choices[0].message.model_extra["reasoning_content"] == "First, think."
            chunks = list(c.chat.completions.create(model="thinker", messages=MSGS, stream=True))
            deltas = [ch.choices[0].delta for ch in chunks]
            assert "".join(d.content or "" for d in deltas) == "Answer: 42"
            assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "First, think."
            r = c.chat.completions.create(model="thinker", messages=MSGS, stop=["r: 4"])
            assert r.choices[0].message.content == "Answe" and r.choices[0].finish_reason == "stop"


def test_engine_survives_bad_step(tok):
    """A failing forward ends that step's requests with an error, and the engine keeps serving."""
    lm = ScriptedLM(script_ids(tok, ["ok", 2]), len(tok))
    with Engine(lm, tok, max_batch=1) as engine:
        real = engine.gen.step
        engine.gen.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        got = []
        engine.submit([5, 6], SamplingParams(temperature=0), got.append)
        deadline = time.time() + 10
        while not got and time.time() < deadline:
            time.sleep(0.01)
        assert got and got[-1].finish_reason == "error"
        engine.gen.step = real
        got2 = []
        engine.submit([5, 6], SamplingParams(temperature=0), got2.append)
        while not (got2 and got2[-1].finish_reason) and time.time() < deadline:
            time.sleep(0.01)
        assert "".join(d.content for d in got2) == "ok"
    assert torch.is_grad_enabled()
