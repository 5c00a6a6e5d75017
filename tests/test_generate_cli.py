"""`python -m engine.generate` on the default model: streaming, --json fields, errors, Ctrl-C."""
import json
import os
import signal
import subprocess
import sys

import pytest

JSON_FIELDS = {"text", "ids", "prompt_tokens", "generated_tokens", "prompt_tok_s", "decode_tok_s", "ttft_s",
               "device", "wbits", "abits", "weight_bytes", "peak_rss_bytes"}


def run(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "engine.generate", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="module")
def default_model(default_gguf):
    return str(default_gguf)


def test_greedy_json_has_the_contract_fields_and_coherent_text(default_model):
    p = run("The capital of France is", "--raw", "--model", default_model, "--max-tokens", "8", "--json",
            "--device", "cpu")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert JSON_FIELDS <= set(out)
    assert out["generated_tokens"] == len(out["ids"]) == 8 and out["wbits"] == 4 and out["abits"] == 16
    assert "Paris" in out["text"] and out["chat"] is False
    assert "Traceback" not in p.stderr


def test_readme_first_command_answers_with_a_sentence_naming_paris(default_model):
    """The instruct model gets its chat template by default (as llama.cpp's CLI does); as plain completion
    the same prompt ran on into "The answer is: 2018-01-22 12:12:53"."""
    p = run("The capital of France is", "--max-tokens", "40", "--json", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["chat"] is True and out["stop_reason"] == "eos"
    assert out["text"].strip() == "The capital of France is Paris."


def test_streams_text_and_prints_statistics_to_stderr(default_model):
    p = run("What is the capital of France?", "--chat", "--model", default_model, "--max-tokens", "20",
            "--device", "cpu")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout
    assert "tok/s" in p.stderr and "tok/s" not in p.stdout


@pytest.mark.parametrize("args,needle", [
    (["hi", "--model", "/nonexistent/model.gguf"], "does not exist"),
    (["hi", "--wbits", "9"], "--wbits"),
    (["hi", "--group", "48"], "multiple of 32"),
    (["hi", "--device", "tpu"], "--device"),
])
def test_bad_input_exits_2_with_one_line(args, needle):
    p = run(*args)
    assert p.returncode == 2
    assert needle in p.stderr and "Traceback" not in p.stderr


def test_prompt_longer_than_context(default_model):
    long_prompt = "word " * 300
    p = run(long_prompt, "--model", default_model, "--context", "128", "--max-tokens", "2", "--device", "cpu")
    assert p.returncode == 2 and "context" in p.stderr and "Traceback" not in p.stderr
    p = run(long_prompt, "--model", default_model, "--context", "128", "--max-tokens", "2", "--truncate",
            "--device", "cpu", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["prompt_tokens"] < 128


def test_ctrl_c_stops_cleanly(default_model):
    proc = subprocess.Popen([sys.executable, "-m", "engine.generate", "Once upon a time, in a small village by the sea,", "--model",
                             default_model, "--max-tokens", "2000", "--device", "cpu", "--context", "4096"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell that starts CI in the background ignores SIGINT, and children inherit
                            # that; a user at a terminal has the default, which this restores
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = proc.stdout.read(1)                     # generation has started
    assert first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
