"""The OpenAI-compatible server, tested with the official `openai` client, and the batching engine."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch
from test_generate import ScriptedLM, script_ids, tiny_model

from tinylm.inference.chat import enable_yarn
from tinylm.inference.engine import Engine, QueueFull
from tinylm.inference.generate import SamplingParams, generate, render_chat
from tinylm.serving.server import BackgroundServer, create_app, free_port

openai = pytest.importorskip("openai")
KEY = "sk-test-key"
MSGS = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def tok():
    from tinylm.text.tokenizer import load_tokenizer

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


# ---------------------------------------------------------------------------------------------
# Disconnects: a slow scripted model that writes visible text, so a stream is really mid-answer.
# ---------------------------------------------------------------------------------------------
STEP_S, LONG = 0.03, 200  # a full LONG-token answer takes >= 6 s; a freed slot is expected within 2 s


@pytest.fixture(scope="module")
def slow(tok):
    lm = ScriptedLM(script_ids(tok, ["word " * (LONG + 20)]), len(tok), delay=STEP_S)
    engine = Engine(lm, tok, max_batch=2, max_queue=4).start()
    with BackgroundServer(create_app(engine, "slow", max_tokens_cap=LONG, default_max_tokens=LONG)) as srv:
        srv.engine = engine
        yield srv
    engine.stop()


def wait_until(cond, timeout: float) -> bool:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


def raw_post(url: str, body: dict) -> socket.socket:
    """Send a request on a bare socket (closing it is an unambiguous client disconnect)."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def assert_freed_and_stopped(engine, steps0: int) -> None:
    assert wait_until(lambda: engine.num_running() == 0 and engine.num_waiting() == 0, 2.0), \
        "the disconnected client's sequence kept its slot"
    assert len(engine.gen.free_rows) == engine.max_batch
    steps = engine.steps
    time.sleep(10 * STEP_S)
    assert engine.steps == steps, "decoding went on after the client left"
    assert steps - steps0 < LONG // 2


def block_rows(engine, tok) -> list:
    """Fill every row with a long request submitted directly, so the next one has to queue."""
    ids = render_chat(tok, MSGS)
    seqs = [engine.submit(ids, SamplingParams(max_new_tokens=LONG, temperature=0, ignore_eos=True), lambda d: None)
            for _ in range(engine.max_batch)]
    assert wait_until(lambda: engine.num_running() == engine.max_batch, 5)
    return seqs


def test_stream_disconnect_mid_answer_frees_the_slot(slow):
    engine, steps0 = slow.engine, slow.engine.steps
    body = {"messages": MSGS, "max_tokens": LONG, "temperature": 0, "stream": True}
    texts = []
    with httpx.stream("POST", slow.url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                texts.append(json.loads(line[6:])["choices"][0]["delta"].get("content"))
            if sum(bool(t) for t in texts) >= 3:
                break  # the client goes away mid-answer
    assert "".join(t or "" for t in texts).startswith("word word")
    assert engine.num_running() == 1
    assert_freed_and_stopped(engine, steps0)


def test_stream_disconnect_while_queued(slow, tok):
    """Headers (200 + role chunk) go out at once, so a client that leaves before its first token is seen."""
    engine = slow.engine
    blockers = block_rows(engine, tok)
    try:
        body = {"messages": MSGS, "max_tokens": 8, "temperature": 0, "stream": True}
        with httpx.stream("POST", slow.url + "/v1/chat/completions", json=body, timeout=3) as r:
            assert r.status_code == 200 and engine.num_waiting() == 1
            first = next(r.iter_lines())
            assert json.loads(first[6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert wait_until(lambda: engine.num_waiting() == 0, 2.0), "the queued request was not dropped"
        assert engine.num_running() == engine.max_batch  # the others go on
    finally:
        for s in blockers:
            engine.cancel(s)
    assert wait_until(lambda: engine.num_running() == 0, 2.0)


def test_non_streaming_disconnect_mid_answer_frees_the_slot(slow):
    engine, steps0 = slow.engine, slow.engine.steps
    sock = raw_post(slow.url, {"messages": MSGS, "max_tokens": LONG, "temperature": 0})
    assert wait_until(lambda: engine.steps - steps0 >= 5, 5), "the request never started decoding"
    assert engine.num_running() == 1
    sock.close()
    assert_freed_and_stopped(engine, steps0)


def test_non_streaming_disconnect_while_queued(slow, tok):
    engine = slow.engine
    blockers = block_rows(engine, tok)
    try:
        sock = raw_post(slow.url, {"messages": MSGS, "max_tokens": 8, "temperature": 0})
        assert wait_until(lambda: engine.num_waiting() == 1, 5)
        sock.close()
        assert wait_until(lambda: engine.num_waiting() == 0, 2.0), "the queued request was not dropped"
        assert engine.num_running() == engine.max_batch
    finally:
        for s in blockers:
            engine.cancel(s)
    assert wait_until(lambda: engine.num_running() == 0, 2.0)


def test_max_tokens_cap_applies_to_the_default(slow):
    """A request without max_tokens gets min(--default-max-tokens, --max-tokens-cap, room)."""
    app = create_app(slow.engine, "capped", max_tokens_cap=5, default_max_tokens=1024)
    with BackgroundServer(app) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)
        r = c.chat.completions.create(model="capped", messages=MSGS)
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
        assert r.choices[0].message.content == "word word word word word"
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="capped", messages=MSGS, max_tokens=6)
        assert e.value.body["param"] == "max_tokens"


def test_frequency_and_presence_penalties(client, model, tok):
    """Applied (same tokens as the sampler's reference, different from no penalty) and range-checked."""
    kw = dict(frequency_penalty=1.5, presence_penalty=0.5)
    ref = generate(model, tok, [MSGS], SamplingParams(max_new_tokens=10, temperature=0, **kw), chat=True)[0]
    plain = reference(model, tok, MSGS, 10)
    assert ref.token_ids != plain.token_ids  # the tiny model repeats one token unless penalised
    r = client.chat.completions.create(model="tiny-test", messages=MSGS, max_tokens=10, temperature=0, **kw)
    assert r.choices[0].message.content == ref.text and r.usage.completion_tokens == len(ref.token_ids)
    for name, value in (("frequency_penalty", 2.5), ("presence_penalty", -3), ("presence_penalty", "a")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-test", messages=MSGS, max_tokens=4, **{name: value})
        assert e.value.status_code == 400 and e.value.body["param"] == name


def test_yarn_extended_context_is_served(tok):
    """With YaRN enabled (as `--yarn-factor` does) the engine, /health and requests use the longer context."""
    lm = enable_yarn(tiny_model(len(tok), max_position_embeddings=32), 4.0)
    prompt = tok.encode("Once upon a time", add_special_tokens=False)
    ref = generate(lm, tok, [prompt], SamplingParams(max_new_tokens=60, temperature=0, ignore_eos=True))[0]
    with Engine(lm, tok, max_batch=1) as engine, BackgroundServer(create_app(engine, "yarn")) as srv:
        assert httpx.get(srv.url + "/health").json()["context"] == 128
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=30)
        r = c.completions.create(model="yarn", prompt=prompt, max_tokens=60, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 60 and len(prompt) + 60 > 32 and r.choices[0].text == ref.text


def test_serve_and_chat_accept_yarn_factor():
    from tinylm.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "m", "--yarn-factor", "4"]).yarn_factor == 4.0
    assert parser.parse_args(["chat", "m", "--yarn-factor", "2.5"]).yarn_factor == 2.5


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


def test_serve_runs_the_model_in_the_main_thread(model, tok):
    """`tinylm serve`'s layout: HTTP in a thread, the engine loop in the calling (main) thread, where
    PyTorch's OpenMP team already lives (Engine.run); stopping the HTTP server ends both."""
    import uvicorn

    from tinylm.serving.server import serve_in_main_thread

    engine = Engine(model, tok, max_batch=2)
    step_threads = []
    step = engine.gen.step
    engine.gen.step = lambda: (step_threads.append(threading.current_thread()), step())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "m"), host="127.0.0.1", port=port, log_level="warning"))
    answers = []

    def client() -> None:
        try:
            deadline = time.time() + 30
            while not server.started and time.time() < deadline:
                time.sleep(0.02)
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=30)
            answers.append(c.chat.completions.create(model="m", messages=MSGS, max_tokens=8, temperature=0))
        finally:
            server.should_exit = True

    threading.Thread(target=client, daemon=True).start()
    assert serve_in_main_thread(engine, server) == 0
    assert answers and answers[0].choices[0].message.content == reference(model, tok, MSGS, 8).text
    assert step_threads and set(step_threads) == {threading.main_thread()}
    with pytest.raises(Exception, match="not running"):  # the engine stopped with the server
        engine.submit([5, 6], SamplingParams(), lambda d: None)


def test_serve_exits_when_the_port_is_taken(model, tok):
    import uvicorn

    from tinylm.serving.server import serve_in_main_thread

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        engine = Engine(model, tok)
        server = uvicorn.Server(uvicorn.Config(create_app(engine, "m"), host="127.0.0.1", port=port,
                                               log_level="critical"))
        t0 = time.time()
        assert serve_in_main_thread(engine, server) == 1
        assert time.time() - t0 < 20
