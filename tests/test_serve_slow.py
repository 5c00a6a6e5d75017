"""The server on the real default model (SmolLM2-135M-Instruct, W4A16): chat through its own template,
and a bounded load test. Slow: run with `pytest -m slow tests/test_serve_slow.py`."""
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from engine.server.host import ServerThread, make_state, model_name  # noqa: E402

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful assistant who answers in one short sentence."
TOPICS = ["the sea", "a red apple", "winter", "the moon", "a small dog", "coffee", "mountains", "rain",
          "a library", "the desert", "music", "a bicycle"]


@pytest.fixture(scope="module")
def smol(default_gguf):
    import engine
    m = engine.load(default_gguf, wbits=4, progress=False, threads=2)
    yield m
    m.close()


def test_chat_on_smollm2_equals_the_python_api(smol, default_gguf):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]
    ref = smol.generate(smol.tokenizer.apply_chat_template(msgs), max_tokens=24)
    state = make_state(smol, model_id=model_name(default_gguf))
    with ServerThread(state) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
        r = c.chat.completions.create(model=state.model_id, messages=msgs, max_tokens=24, temperature=0)
        assert r.choices[0].message.content == ref.text
        assert "Paris" in ref.text
        s = c.chat.completions.create(model=state.model_id, messages=msgs, max_tokens=24, temperature=0, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices) == ref.text


def test_load_16_clients_loses_and_mixes_nothing(smol):
    """16 clients, 192 requests over 12 prompts sharing a system prompt, 600 s at most: every request
    answered, each answer equal to the same prompt's answer when it was served alone."""
    state = make_state(smol, model_id="smol", parallel=4, queue_size=64)
    deadline = time.monotonic() + 600
    with ServerThread(state) as srv:
        def ask(c, topic):
            return c.chat.completions.create(
                model="smol", temperature=0, max_tokens=6, timeout=300,
                messages=[{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": f"Say something about {topic}."}]).choices[0].message.content
        c0 = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        alone = {t: ask(c0, t) for t in TOPICS}
        assert len(set(alone.values())) > len(TOPICS) // 2          # the answers tell prompts apart
        got, errors = [], []
        lock = threading.Lock()

        def client(k):
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            for j in range(12):
                if time.monotonic() > deadline:
                    errors.append(f"client {k}: out of time")
                    return
                t = TOPICS[(k * 5 + j) % len(TOPICS)]
                try:
                    a = ask(c, t)
                except Exception as e:      # noqa: BLE001 - counted as lost
                    errors.append(f"client {k} request {j}: {e!r}")
                    continue
                with lock:
                    got.append((t, a))
        ts = [threading.Thread(target=client, args=(k,)) for k in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(max(1.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in ts), "the load test ran past its time limit"
        assert not errors, errors[:5]
        assert len(got) == 16 * 12
        wrong = [(t, a) for t, a in got if a != alone[t]]
        assert not wrong, wrong[:3]
        assert state.scheduler.prefix_cache.hits > 0
