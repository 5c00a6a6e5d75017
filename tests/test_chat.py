"""Multi-turn chat: the KV cache kept between turns (same ids as a fresh computation), stop strings
(never emitted, also across pieces), /reset and the exits of `python -m engine.chat`."""
import subprocess
import sys

import pytest

from engine.stop_text import StopText

# ---- stop strings -------------------------------------------------------------------------------


def feed(stop, pieces):
    st = StopText(stop)
    out = [st.push(p) for p in pieces]
    return out, st.flush(), st.hit


def test_stop_inside_one_piece():
    out, tail, hit = feed(["END"], ["abc", "dEND and more", "ignored"])
    assert "".join(out) + tail == "abcd" and hit == "END" and out[-1] == ""


def test_stop_across_pieces_is_held_back_then_dropped():
    out, tail, hit = feed(["<|end|>"], ["Hello <", "|e", "nd|>", "x"])
    assert out == ["Hello ", "", "", ""] and tail == "" and hit == "<|end|>"


def test_held_back_text_released_when_it_is_no_stop():
    out, tail, hit = feed(["<|end|>"], ["a <|e", "x", " b <"])
    assert out == ["a ", "<|ex", " b "] and tail == "<" and hit is None


def test_earliest_of_several_stops():
    out, _, hit = feed(["world", "lo w"], ["hello world"])
    assert out == ["hel"] and hit == "lo w"


def test_bad_stop():
    with pytest.raises(ValueError, match="non-empty str"):
        StopText([""])


# ---- the API on the default model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def model(default_gguf):
    import engine
    m = engine.load(str(default_gguf), device="cpu", progress=False)
    yield m
    m.close()


def test_three_turns_reuse_the_cache_and_match_fresh_runs(model):
    model.reset_chat()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    for i, follow_up in enumerate(["And of Germany?", "Which of the two is larger?", None]):
        r = model.chat(msgs, max_tokens=12)
        assert r.stats["chat_template"] == "model"
        cached = r.stats["cached_prompt_tokens"]
        assert (cached == 0) if i == 0 else (cached > 30)
        fresh = model.generate(model.tokenizer.encode_chat(msgs), max_tokens=12)
        assert fresh.ids == r.ids                 # the kept cache gives what a fresh prefill gives
        if follow_up:
            msgs += [{"role": "assistant", "content": r.text}, {"role": "user", "content": follow_up}]
    assert "Paris" in model.tokenizer.decode(model._chat_ids)
    model.reset_chat()
    assert model.chat(msgs[:1], max_tokens=2).stats["cached_prompt_tokens"] == 0


def test_stop_strings_in_stream_and_text(model):
    prompt = "The capital of France is"
    pieces = list(model.stream(prompt, max_tokens=16))
    full = "".join(pieces)
    k = next(i for i in range(1, len(pieces)) if len(pieces[i - 1]) >= 2 and len(pieces[i]) >= 2)
    across = pieces[k - 1][-2:] + pieces[k][:2]            # spans two streamed pieces
    inside = full[full.index("Paris") + 2:][:3]              # inside one token ("ris")
    for stop in (across, inside):
        got = list(model.stream(prompt, max_tokens=16, stop=["never appears", stop]))
        r = model.last
        assert r.stop_reason == "stop" and "".join(got) == r.text == full[:full.index(stop)]
        assert all(stop not in p for p in got)


# ---- python -m engine.chat ----------------------------------------------------------------------

def run_chat(module_args, stdin, timeout=300):
    return subprocess.run([sys.executable, "-m", *module_args], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def test_chat_cli_turns_reset_and_exit(default_gguf):
    p = run_chat(["engine.chat", "--model", str(default_gguf), "--device", "cpu", "--max-tokens", "16"],
                 "What is the capital of France?\nAnd of Germany?\n/reset\nHi\n/exit\nnever read\n")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout and "Berlin" in p.stdout
    assert "[conversation cleared]" in p.stderr and "the model's own" in p.stderr
    stats = [line for line in p.stderr.splitlines() if "from the cache" in line]
    assert len(stats) == 3 and "(0 from the cache)" in stats[0] and "(0 from the cache)" not in stats[1]
    assert "(0 from the cache)" in stats[2]             # after /reset
    assert "Traceback" not in p.stderr


def test_generate_interactive_ends_at_eof(default_gguf):
    p = run_chat(["engine.generate", "--interactive", "--model", str(default_gguf), "--device", "cpu",
                  "--max-tokens", "8", "--stop", "Paris"], "What is the capital of France?\n")
    assert p.returncode == 0, p.stderr
    assert "Paris" not in p.stdout and "stop: stop" in p.stderr and "Traceback" not in p.stderr


def test_chat_cli_ctrl_c_at_the_prompt_exits_cleanly(default_gguf):
    import os
    import signal
    import time
    # a shell that starts CI in the background ignores SIGINT, and children inherit that: give the CLI the
    # default disposition, as a terminal would
    p = subprocess.Popen([sys.executable, "-m", "engine.chat", "--model", str(default_gguf), "--device", "cpu"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        banner = p.stderr.readline()                   # printed once the model is loaded
        assert "chat template" in banner
        time.sleep(0.3)
        os.kill(p.pid, signal.SIGINT)
        p.wait(timeout=60)          # stdin stays open: only the signal can end the prompt (EOF would exit 0)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and "Traceback" not in err


def test_model_without_template_falls_back_to_chatml_and_says_so(model):
    own = model.tokenizer.chat_template
    model.tokenizer.chat_template = None                    # as for a model whose files carry none
    try:
        r = model.chat([{"role": "user", "content": "hello"}], max_tokens=2)
        assert r.stats["chat_template"] == "chatml-fallback"
        assert model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == (
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    finally:
        model.tokenizer.chat_template = own
        model.reset_chat()
