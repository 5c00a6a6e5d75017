"""The server's parts without HTTP: stop strings, the prefix cache, Model.stream with its new options."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine.prefix_cache import PrefixCache, common_prefix
from engine.stop_text import StopText as StopMatcher
from tests.serve_fixtures import tiny_model  # noqa: F401  (a fixture)


# ---- stop strings ----------------------------------------------------------------------------------

def ref_stop(text, stops):
    idx = [text.find(s) for s in stops if s and s in text]
    return text[:min(idx)] if idx else text


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abc\u00e9", max_size=30), st.lists(st.text(alphabet="abc\u00e9", min_size=1, max_size=4), max_size=3),
       st.lists(st.integers(0, 30), max_size=6))
def test_stop_matcher_equals_find_on_the_whole_text(text, stops, cuts):
    cuts = sorted(set(c for c in cuts if c <= len(text)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    m = StopMatcher(stops)
    out = "".join(m.push(p) for p in pieces) + m.flush()
    assert out == ref_stop(text, stops)
    assert (m.hit is not None) == (ref_stop(text, stops) != text or any(s and s in text for s in stops))


def test_stop_matcher_holds_back_a_possible_start():
    m = StopMatcher(["</end>"])
    assert m.push("hello </e") == "hello "
    assert m.push("nd> more") == "" and m.hit == "</end>"
    m = StopMatcher(["</end>"])
    assert m.push("a </e") == "a " and m.push("xit") == "</exit" and m.flush() == ""
    # a complete stop string must wait while a longer one may still begin before it (found by hypothesis)
    m = StopMatcher(["b", "aba"])
    assert m.push("aab") == "a" and m.push("a") == "" and m.hit == "aba"
    m = StopMatcher(["b", "aba"])
    assert m.push("aab") == "a" and m.flush() == "a" and m.hit == "b"


# ---- the prefix cache ------------------------------------------------------------------------------

class FakeCache:
    def __init__(self):
        self.n, self.closed = 0, False

    def close(self):
        self.closed = True


def test_prefix_cache_reuses_the_longest_prefix_and_leaves_two_tokens():
    made = []
    pc = PrefixCache(lambda: made.append(FakeCache()) or made[-1], capacity=2)
    c, n = pc.acquire([1, 2, 3, 4, 5])
    assert n == 0 and c.n == 0
    c.n = 7                                 # prompt prefilled and 2 tokens decoded
    pc.release(c, [1, 2, 3, 4, 5])
    c2, n = pc.acquire([1, 2, 3, 9, 9, 9])
    assert c2 is c and n == 3 and c.n == 3
    pc.release(c2, [1, 2, 3])               # only 3 rows are trusted now
    c3, n = pc.acquire([1, 2, 3])           # the same prompt again: two tokens are prefilled
    assert c3 is c and n == 1
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_prefix_cache_is_bounded_lru():
    made = []
    pc = PrefixCache(lambda: made.append(FakeCache()) or made[-1], capacity=2)
    held = [pc.acquire(p)[0] for p in ([1, 1, 1], [2, 2, 2], [3, 3, 3])]     # three in use at once
    assert len(made) == 3
    for c, p in zip(held, ([1, 1, 1], [2, 2, 2], [3, 3, 3])):
        c.n = 3
        pc.release(c, p)
    assert len(pc) == 2 and made[0].closed and not made[1].closed and not made[2].closed
    c, n = pc.acquire([2, 2, 2, 5])                                           # a hit refreshes it
    assert c is made[1] and n == 2
    c.n = 4
    pc.release(c, [2, 2, 2, 5])
    c, n = pc.acquire([4, 4, 4])            # full: the least recently used one's memory is reused
    assert c is made[2] and n == 0 and c.n == 0 and len(made) == 3
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(FakeCache, capacity=0)


# ---- on a tiny model -------------------------------------------------------------------------------

def test_prefix_cache_hit_gives_the_logits_of_a_fresh_prefill(tiny_model):
    m = tiny_model
    dec = m.decoder
    a = m.tokenize("the world hello the world again and again")
    b = a[:6] + m.tokenize(" tell me more")
    c = dec.new_cache()
    fresh = dec.forward(b, c)
    c.close()
    pc = PrefixCache(dec.new_cache, 2)
    c, n = pc.acquire(a)
    dec.forward(a, c)
    pc.release(c, a)
    c, n = pc.acquire(b)
    assert n == 6
    hit = dec.forward(b[n:], c)
    assert np.array_equal(hit, fresh)
    pc.release(c, b)
    pc.clear()


def test_model_stream_with_prefix_cache_and_new_options(tiny_model):
    m = tiny_model
    kw = dict(max_tokens=12, temperature=0.9, seed=11, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3)
    ref = m.generate("hello world, the world", logprobs=3, **kw)
    assert ref.logprobs is not None and len(ref.logprobs) == len(ref.ids)
    assert all(len(e.top) == 3 and e.top[0][1] >= e.top[-1][1] for e in ref.logprobs)
    m.prefix_cache = PrefixCache(m.decoder.new_cache, 2)
    try:
        first = m.generate("hello world, the world", **kw)
        again = m.generate("hello world, the world", **kw)
        assert first.ids == ref.ids == again.ids
        assert first.stats["prefix_reused"] == 0 and again.stats["prefix_reused"] > 0
        assert again.logprobs is None
    finally:
        m.prefix_cache.clear()
        m.prefix_cache = None


def test_bench_serve_runs_on_a_tiny_model(tmp_path):
    """tools/bench_serve.py end to end (server subprocess, 8 streams, the prefix pair), no peer."""
    import json
    from tests.serve_fixtures import write_tiny_chat_gguf
    from tools import bench_serve
    path = tmp_path / "tiny-chat.gguf"
    write_tiny_chat_gguf(path)
    out = tmp_path / "r.json"
    assert bench_serve.main(["--model", str(path), "--threads", "1", "--max-tokens", "4", "--rounds", "1",
                             "--prefix-tokens", "100", "--no-peer",
                             "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    s = r["summary"]
    assert r["rounds"][0]["ours_8"]["completion_tokens"] > 0 and s["llama_8_agg_tok_s"] is None
    assert s["prefix_tokens"] >= 100 and s["prefix_ttft_speedup"] > 0
    e = r["rounds"][0]["engine"]
    assert e["step_1_ms"] > 0 and e["step_8_ms"] > 0
    assert abs(e["decode_8_vs_1"] - 8 * e["step_1_ms"] / e["step_8_ms"]) < 1e-9
    assert s["engine_decode_8_vs_1"] == e["decode_8_vs_1"]


def test_bench_serve_summary_pairs_each_rounds_sides():
    """The paired ratio divides each round's 8-stream rate by the same round's 1-stream rate; the medians of
    the two sides apart pair round 0's 8-stream side with round 2's 1-stream side here."""
    from tools.bench_serve import summary

    def rnd(d8, d1):
        return {"ours_8": {"decode_tok_s": d8, "agg_tok_s": 1.0}, "ours_1": {"decode_tok_s": d1, "agg_tok_s": 1.0},
                "prefix": {"prefix_tokens": 400, "speedup": 10.0, "first_ttft_s": 1.0, "second_ttft_s": 0.1}}
    s = summary({"rounds": [rnd(500.0, 250.0), rnd(300.0, 100.0), rnd(600.0, 240.0)]})
    assert s["decode_8_vs_1_per_round"] == [2.0, 3.0, 2.5]
    assert s["decode_8_vs_1_paired_median"] == 2.5
    assert s["decode_8_vs_1"] == 500.0 / 240.0          # the medians' ratio, for comparison


def test_scheduler_takes_a_batched_decode_step_when_the_decoder_has_one(tiny_model):
    """The step_batch hook: the scheduler hands every active sequence to it at once; answers are
    those of the Python API (here step_batch runs the rows one by one, so they are exact). The prompts
    admitted together are prefilled in one step (a run of rows per prompt), with the same answers."""
    import threading
    from engine.sampling import SamplingParams
    from engine.server.scheduler import Job, Scheduler
    m = tiny_model
    dec = m.decoder
    calls = []

    def step_batch(tokens, caches):
        calls.append(len(tokens))
        return np.stack([dec.forward([t], c) for t, c in zip(tokens, caches)])
    prompts = ["hello world", "the world", "tell me more", "again and again"]
    want = [m.generate(p, max_tokens=8, temperature=0.8, seed=i).text for i, p in enumerate(prompts)]
    joint = []
    real_step = dec.step

    def step(ids, pos, caches, out_rows):
        joint.append(len({id(c) for c in caches}))
        return real_step(ids, pos, caches, out_rows)
    dec.step_batch, dec.step = step_batch, step
    try:
        sched = Scheduler(m, slots=4)
        got = [[] for _ in prompts]
        done = threading.Semaphore(0)

        def emit_for(i):
            def emit(ev):
                if ev.kind == "delta":
                    got[i].append(ev.text)
                else:
                    done.release()
            return emit
        for i, p in enumerate(prompts):      # all queued before the worker starts: they run together
            sched.submit(Job(m.tokenize(p), SamplingParams(temperature=0.8, seed=i), 8, emit_for(i)))
        sched.start()
        for _ in prompts:
            assert done.acquire(timeout=30)
        sched.stop()
    finally:
        del dec.step_batch, dec.step
    assert ["".join(g) for g in got] == want
    assert max(calls) == 4 and joint[0] == 4


def test_decoder_step_batch_matches_each_sequence_alone(tiny_model):
    """Batched decode (the server's step_batch): N sequences at different positions, each with its own
    cache, in one step give the logits each would get from its own forward, and every cache advances."""
    d = tiny_model.decoder
    prompts = [[1, 5, 9, 3], [2, 7], [4, 4, 4, 8, 1, 6]]
    alone, caches, nxt = [], [], []
    for p in prompts:
        c = d.new_cache()
        lg = d.forward(p, c)
        t = int(np.argmax(lg))
        c2 = d.new_cache()
        d.forward(p, c2)
        alone.append(d.forward([t], c2))
        c2.close()
        caches.append(c)
        nxt.append(t)
    got = d.step_batch(nxt, caches)
    assert got.shape == (3, len(alone[0]))
    for g, a, c, p in zip(got, alone, caches, prompts):
        np.testing.assert_allclose(g, a, rtol=1e-3, atol=1e-3 * np.abs(a).max())
        assert int(np.argmax(g)) == int(np.argmax(a)) and c.n == len(p) + 1
    with pytest.raises(ValueError):
        d.step_batch([1, 2], [caches[0], caches[0]])
    for c in caches:
        c.close()
