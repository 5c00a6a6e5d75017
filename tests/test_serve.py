"""The HTTP server driven by the real `openai` client on 127.0.0.1, with a tiny random model.

The answers are checked against the Python API (engine/api.Model, an independent loop over the same
sampler) and logprobs against a float64 log-softmax of a fresh prefill.
"""
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from engine.server.host import ServerThread, make_state  # noqa: E402
from engine.server.scheduler import Event, Job  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from tests.serve_fixtures import tiny_embedder, tiny_model  # noqa: E402,F401  (fixtures)

MSG = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def server(tiny_model, tiny_embedder):
    state = make_state(tiny_model, tiny_embedder, model_id="tiny", embed_id="tiny-bert", parallel=2, queue_size=4)
    with ServerThread(state) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@contextmanager
def slowed_forward(model, seconds, when=lambda ids: True):
    """model's decoder.forward sleeps `seconds` before the calls `when(ids)` picks; yields the calls' sizes."""
    dec = model.decoder
    real, calls = dec.forward, []

    def forward(ids, cache, **kw):
        calls.append(len(ids))
        if when(ids):
            time.sleep(seconds)
        return real(ids, cache, **kw)
    dec.forward = forward
    try:
        yield calls
    finally:
        dec.forward = real


def chat_prompt_ids(m, messages):
    return m.tokenize(m.tokenizer.apply_chat_template(messages))


def test_models_and_health(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "tiny-bert"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["slots"] == 2


def test_chat_equals_python_api_and_stream_equals_non_stream(client, tiny_model):
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.95, seed=123)
    r = client.chat.completions.create(model="tiny", messages=MSG, **kw)
    ref = tiny_model.generate(chat_prompt_ids(tiny_model, MSG), **kw)
    text = r.choices[0].message.content
    assert text == ref.text and r.usage.completion_tokens == len(ref.ids) == 24
    assert r.usage.prompt_tokens == ref.prompt_tokens and r.choices[0].finish_reason == "length"
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, stream=True,
                                                 stream_options={"include_usage": True}, **kw))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].choices == []
    other = client.chat.completions.create(model="tiny", messages=MSG, **dict(kw, seed=124))
    assert other.choices[0].message.content != text          # the seed matters


def test_completions_greedy_stream_and_penalties(client, tiny_model):
    prompt = "the world hello"
    kw = dict(max_tokens=16, temperature=0.0, presence_penalty=0.8, frequency_penalty=0.5, repeat_penalty=1.1)
    r = client.completions.create(model="tiny", prompt=prompt, **{k: v for k, v in kw.items() if k != "repeat_penalty"},
                                  extra_body={"repeat_penalty": 1.1})
    ref = tiny_model.generate(prompt, **kw)
    assert r.choices[0].text == ref.text and r.object == "text_completion"
    plain = tiny_model.generate(prompt, max_tokens=16)
    assert plain.ids != ref.ids                               # the penalties did something
    s = client.completions.create(model="tiny", prompt=prompt, stream=True,
                                  **{k: v for k, v in kw.items() if k != "repeat_penalty"},
                                  extra_body={"repeat_penalty": 1.1})
    assert "".join(c.choices[0].text for c in s if c.choices) == ref.text


def test_stop_strings_are_never_emitted(client, tiny_model):
    kw = dict(max_tokens=40, temperature=1.0, seed=5)
    full = client.completions.create(model="tiny", prompt="hello", **kw).choices[0].text
    assert len(full) > 6
    stop = full[3:5]
    want = full[:full.find(stop)]
    r = client.completions.create(model="tiny", prompt="hello", stop=[stop, "\u0000never"], **kw)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    s = client.completions.create(model="tiny", prompt="hello", stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].text for c in s if c.choices) == want


def test_logprobs_match_a_float64_reference(client, tiny_model):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0.0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    ids = chat_prompt_ids(tiny_model, MSG)
    gen = tiny_model.generate(ids, max_tokens=6).ids
    logits = tiny_model.logits(ids + gen).astype(np.float64)[len(ids) - 1:-1]
    ref = logits - logits.max(axis=1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(axis=1, keepdims=True))
    for row, e, t in zip(ref, content, gen):
        assert e.token == tiny_model.tokenizer.decode([t])
        assert abs(e.logprob - row[t]) < 2e-3              # decode steps vs one prefill: last bits differ
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[2].logprob
        assert abs(e.top_logprobs[0].logprob - row.max()) < 2e-3
    c = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.top_logprobs[0]) <= 2 and lp.text_offset[0] == 0


def test_embeddings(client, tiny_embedder):
    texts = ["hello world", "the cat"]
    r = client.embeddings.create(model="tiny-bert", input=texts)      # the client asks for base64
    ref = tiny_embedder.embed(texts)
    got = np.array([d.embedding for d in r.data], np.float32)
    assert np.array_equal(got, ref)
    assert r.usage.prompt_tokens == sum(len(s) for s in tiny_embedder.tokenize(texts))
    one = client.embeddings.create(model="tiny-bert", input="hello world", encoding_format="float")
    assert np.allclose(one.data[0].embedding, ref[0], atol=1e-6)


@pytest.mark.parametrize("kw,param", [(dict(temperature=3), "temperature"), (dict(top_p=0), "top_p"),
                                      (dict(n=2), "n"), (dict(max_tokens=0), "max_tokens"),
                                      (dict(extra_body={"min_p": 2}), "min_p"),
                                      (dict(top_logprobs=2), "top_logprobs"),
                                      (dict(messages=[{"role": "robot", "content": "x"}]), "messages")])
def test_bad_parameters_are_400(client, kw, param):
    kw.setdefault("messages", MSG)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", **kw)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_prompt_over_the_context_is_400_with_the_numbers(client, tiny_model):
    ctx = tiny_model.decoder.context
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[5] * (ctx + 3))
    assert e.value.body["code"] == "context_length_exceeded"
    assert str(ctx) in e.value.message and str(ctx + 3) in e.value.message
    with pytest.raises(openai.BadRequestError, match=f"{ctx - 10 + 50} tokens"):
        client.completions.create(model="tiny", prompt=[5] * (ctx - 10), max_tokens=50)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="tiny", input="x")


def test_api_key(tiny_model):
    state = make_state(tiny_model, model_id="tiny", api_key="s3cret")
    with ServerThread(state) as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}).status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200       # health needs no key
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hello", max_tokens=2).usage.completion_tokens == 2


def test_queue_full_is_503_with_retry_after(tiny_model):
    state = make_state(tiny_model, model_id="tiny", parallel=1, queue_size=1)
    gate = threading.Event()
    # a job whose first event blocks the worker, so that the queue stays as we fill it
    state.scheduler.submit(Job(chat_prompt_ids(tiny_model, MSG), SamplingParams(), 2,
                               lambda ev: gate.wait(10)))
    with ServerThread(state) as srv:
        try:
            t0 = time.monotonic()
            while state.scheduler.load()["active"] == 0 and time.monotonic() - t0 < 10:
                time.sleep(0.01)
            waiting = threading.Thread(target=lambda: httpx.post(
                srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=20))
            waiting.start()
            while state.scheduler.load()["waiting"] == 0 and time.monotonic() - t0 < 10:
                time.sleep(0.01)
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.APIStatusError) as e:
                c.completions.create(model="tiny", prompt="hi", max_tokens=2)
            assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        finally:
            gate.set()
        waiting.join(20)
        assert c.completions.create(model="tiny", prompt="hi", max_tokens=2).choices[0].finish_reason


def test_client_that_disconnects_frees_its_slot(tiny_model):
    assert tiny_model.generate("hello", max_tokens=240).generated_tokens == 240     # no early end
    state = make_state(tiny_model, model_id="tiny", parallel=1)
    with slowed_forward(tiny_model, 0.05) as steps:     # a 240-token answer would take 12 s
        with ServerThread(state) as srv:
            with httpx.stream("POST", srv.url + "/v1/completions", timeout=20,
                              json={"prompt": "hello", "max_tokens": 240, "stream": True, "temperature": 0}) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        break                   # one chunk, then hang up
            t0 = time.monotonic()
            while state.scheduler.load()["active"] and time.monotonic() - t0 < 6:
                time.sleep(0.02)
            assert state.scheduler.load()["active"] == 0 and state.scheduler.load()["served"] == 1
            assert len(steps) < 150
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            assert c.completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens == 3


def test_concurrent_requests_do_not_mix(server, tiny_model):
    prompts = [f"{w} world {i}" for i, w in enumerate(["hello", "the", "world", "hello the", "tell", "more"])]
    alone = {p: tiny_model.generate(p, max_tokens=10).text for p in prompts}
    results, errors = {}, []

    def one(p):
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=3)
            results[p] = c.completions.create(model="tiny", prompt=p, max_tokens=10, temperature=0).choices[0].text
        except Exception as e:      # noqa: BLE001 - reported below
            errors.append(e)
    ts = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors and results == alone


def test_worker_event_shapes():
    e = Event("done", finish_reason="stop", prompt_tokens=3, completion_tokens=2)
    assert e.text == "" and e.logprobs == []


def test_non_stream_client_that_goes_away_frees_its_slot(tiny_model):
    assert tiny_model.generate("hello", max_tokens=240).generated_tokens == 240     # no early end
    state = make_state(tiny_model, model_id="tiny", parallel=1)
    with slowed_forward(tiny_model, 0.05) as steps:     # a 240-token answer would take 12 s
        with ServerThread(state) as srv:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(srv.url + "/v1/completions", timeout=0.3,
                           json={"prompt": "hello", "max_tokens": 240, "temperature": 0})
            t0 = time.monotonic()
            while state.scheduler.load()["active"] and time.monotonic() - t0 < 6:
                time.sleep(0.02)
            assert state.scheduler.load()["active"] == 0 and len(steps) < 150


def test_a_quiet_stream_sends_keep_alive_comments(tiny_model, monkeypatch):
    # nothing to send for PING_S (here a slow prefill): SSE comments, then the answer as usual
    from engine.server import app as app_mod
    monkeypatch.setattr(app_mod, "PING_S", 0.1)
    state = make_state(tiny_model, model_id="tiny", parallel=1)
    with slowed_forward(tiny_model, 0.5, when=lambda ids: len(ids) > 1):     # a slow prefill
        with ServerThread(state) as srv:
            with httpx.stream("POST", srv.url + "/v1/completions", timeout=20,
                              json={"prompt": "hello", "max_tokens": 3, "stream": True, "temperature": 0}) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                lines = [ln for ln in r.iter_lines() if ln]
        pings = [i for i, ln in enumerate(lines) if ln == ": ping"]
        data = [i for i, ln in enumerate(lines) if ln.startswith("data: ")]
        assert len(pings) >= 2 and max(pings) < min(data)
        assert lines[-1] == "data: [DONE]" and len(lines) == len(pings) + len(data)


def test_the_command(tmp_path):
    """`python -m engine.serve` itself: bad options exit 2 with one line; a tiny model serves."""
    import os
    import socket
    import subprocess
    import sys
    from tests.serve_fixtures import write_tiny_chat_gguf
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "engine.serve", "--port", "70000"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 2 and "--port" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "engine.serve", "--model", str(tmp_path / "missing.gguf")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "missing.gguf" in r.stderr and "Traceback" not in r.stderr
    path = tmp_path / "tiny-chat.gguf"
    write_tiny_chat_gguf(path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "engine.serve", "--model", str(path), "--wbits", "8", "--threads", "1",
                          "--port", str(port), "--api-key", "k"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        t0 = time.monotonic()
        while True:
            assert p.poll() is None, p.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < 120, "the server did not come up"
            time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["tiny-chat"]
        r = c.chat.completions.create(model="tiny-chat", messages=MSG, max_tokens=3)
        assert r.usage.completion_tokens == 3
    finally:
        p.terminate()
        p.wait(30)
