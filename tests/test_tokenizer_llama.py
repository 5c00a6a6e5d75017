"""anybit's GGUF tokenizers against llama.cpp's ids, for every vocabulary kind.

The reference is tests/data/llama_cpp_tokens.json: ids recorded FROM llama.cpp (llama-cpp-python) by
tests/data_gen/llama_cpp_tokens.py on the vocabularies of tests/data_gen/llama_vocab.py, which this test
rebuilds from the default models: SmolLM2's BPE under every pre-tokenizer name, SentencePiece
vocabularies (with and without llama.cpp's space prefix), MiniLM's WordPiece as llama.cpp's converter
writes it. The Gemma 3 cases need its GGUF (slow; ANYBIT_GEMMA_GGUF or the cache), and the live
comparison needs llama-cpp-python (slow; skipped with the reason when it is absent).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loader.tokenizer import Tokenizer
from tests.data_gen import llama_vocab as lv

DATA = Path(__file__).parent / "data" / "llama_cpp_tokens.json"
GEN = Path(__file__).parent / "data_gen" / "llama_cpp_tokens.py"


@pytest.fixture(scope="module")
def ref():
    return json.loads(DATA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smol(default_gguf):
    return lv.read_meta(default_gguf)


def gemma_path():
    env = os.environ.get("ANYBIT_GEMMA_GGUF")
    if env:
        return Path(env)
    from loader.fetch import cache_dir
    hits = sorted(cache_dir().glob("**/gemma-3-270m*.gguf"))
    return hits[0] if hits else None


def meta_for(name, smol, minilm_dir):
    kind, what = name.split(":", 1)
    if kind == "bpe":
        return lv.bpe_meta(smol, what)
    if name == "spm:smol":
        return lv.spm_meta(smol)
    if name == "spm:smol-no-prefix":
        return lv.spm_meta(smol, space_prefix=False)
    if name == "wpm:minilm":
        return lv.bert_meta((minilm_dir / "tokenizer.json").read_text(encoding="utf-8"))
    raise KeyError(name)


def check(tk: Tokenizer, case: dict, texts, name):
    bad = []
    for text, want in zip(texts, case["ids"]):
        got = tk.encode(text, parse_special=False)
        if got != want:
            bad.append(f"{text!r}: anybit {got} llama.cpp {want}")
    for text, want in zip(texts, case["add_bos_ids"]):
        got = tk.encode(text, add_special=True, parse_special=False)
        if got != want:
            bad.append(f"(special) {text!r}: anybit {got} llama.cpp {want}")
    assert not bad, f"{name}: {len(bad)} texts differ from llama.cpp:\n" + "\n".join(bad[:5])


# the list, one lookahead-style pattern, every non-BPE kind: in the default run; every other
# recorded pre-tokenizer name in the slow run (each case builds a 49k-entry tokenizer)
FAST = {"bpe:default", "bpe:llama-bpe", "bpe:qwen2", "bpe:deepseek-llm", "bpe:deepseek-coder", "bpe:falcon",
        "bpe:mpt", "bpe:starcoder", "bpe:refact", "bpe:command-r", "bpe:gpt-2", "bpe:smollm", "bpe:gpt-4o",
        "spm:smol", "spm:smol-no-prefix", "wpm:minilm"}


def _recorded_cases():
    try:
        names = sorted(n for n in json.loads(DATA.read_text(encoding="utf-8"))["cases"]
                       if not n.startswith("spm:gemma"))
    except (OSError, ValueError, KeyError):
        return ["missing-fixture"]
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


def test_fixture_covers_every_kind(ref):
    cases = ref["cases"]
    assert {"bpe:llama-bpe", "bpe:qwen2", "bpe:deepseek-llm", "bpe:deepseek-coder", "bpe:falcon", "bpe:mpt",
            "bpe:starcoder", "bpe:refact", "bpe:command-r", "bpe:gpt-2", "bpe:smollm", "spm:smol",
            "spm:smol-no-prefix", "wpm:minilm"} <= set(cases)
    assert all(len(c["ids"]) == len(ref["texts"]) for c in cases.values())


@pytest.mark.parametrize("name", _recorded_cases())
def test_same_ids_as_llama_cpp(name, ref, smol, default_minilm):
    tk = Tokenizer.from_gguf_metadata(meta_for(name, smol, default_minilm), name)
    check(tk, ref["cases"][name], ref["texts"], name)


@pytest.mark.parametrize("name", ["spm:smol", "spm:smol-no-prefix", "bpe:qwen2", "bpe:llama-bpe"])
def test_lossless(name, smol, default_minilm):
    tk = Tokenizer.from_gguf_metadata(meta_for(name, smol, default_minilm), name)
    for text in lv.TEXTS:
        ids = tk.encode(text, parse_special=False)
        assert tk.decode(ids) == text
        sd = tk.stream_decoder()
        assert "".join([sd.push(i) for i in ids] + [sd.flush()]) == text


@pytest.mark.slow
@pytest.mark.parametrize("as_llama2", [False, True], ids=["gemma3", "gemma3-llama2"])
def test_gemma3_vocabulary(as_llama2, ref):
    """The Gemma 3 file's SentencePiece vocabulary: llama.cpp's ids, and text back unchanged."""
    path = gemma_path()
    if path is None or not path.is_file():
        pytest.skip("the Gemma 3 270M GGUF is not here (set ANYBIT_GEMMA_GGUF or put it in the anybit cache)")
    name = "spm:gemma3-llama2" if as_llama2 else "spm:gemma3"
    if name not in ref["cases"]:
        pytest.skip(f"{name}: not in the fixture (regenerate it with --gemma)")
    tk = Tokenizer.from_gguf_metadata(lv.gemma_meta(path, as_llama2=as_llama2), name)
    check(tk, ref["cases"][name], ref["texts"], name)
    if not as_llama2:   # with the space prefix, llama.cpp itself adds a space after every user-defined token
        for text in lv.TEXTS:
            ids = tk.encode(text, parse_special=False)
            assert tk.decode(ids) == text
            sd = tk.stream_decoder()
            assert "".join([sd.push(i) for i in ids] + [sd.flush()]) == text


@pytest.mark.slow
def test_fixture_matches_live_llama_cpp(tmp_path, ref, default_gguf, default_minilm):
    """Regenerate the recordings with llama.cpp now: the committed fixture is what llama.cpp says."""
    from tools.bench.peers import find_llama
    py, note = find_llama()
    if py is None:
        pytest.skip(f"llama-cpp-python is not installed: {note}")
    out = tmp_path / "live.json"
    p = subprocess.run([str(py), str(GEN), "--smol", str(default_gguf), "--minilm",
                        str(default_minilm / "tokenizer.json"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    live = json.loads(out.read_text(encoding="utf-8"))
    assert live["texts"] == ref["texts"]
    for name, case in live["cases"].items():
        assert ref["cases"].get(name) == case, f"{name}: the fixture differs from llama.cpp now"


# pre-tokenizers whose patterns llama.cpp runs through std::regex with lookaheads that can differ at the
# edge of an earlier split (a space before U+3000 for deepseek-llm, whitespace before digits for
# tiny_aya): known differences, left out of the random comparison
RANDOM_CASES = ["bpe:default", "bpe:llama-bpe", "bpe:qwen2", "bpe:deepseek-coder", "bpe:deepseek-v3", "bpe:falcon",
                "bpe:gpt-2", "bpe:smollm", "bpe:gpt-4o", "bpe:tekken", "bpe:bloom", "bpe:qwen35", "spm:smol",
                "spm:smol-no-prefix", "wpm:minilm"]


@pytest.mark.slow
def test_random_texts_match_live_llama_cpp(tmp_path, smol, default_gguf, default_minilm):
    from tools.bench.peers import find_llama
    py, note = find_llama()
    if py is None:
        pytest.skip(f"llama-cpp-python is not installed: {note}")
    texts = lv.random_texts(200, seed=1)
    (tmp_path / "texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "live.json"
    p = subprocess.run([str(py), str(GEN), "--smol", str(default_gguf), "--minilm",
                        str(default_minilm / "tokenizer.json"), "--texts", str(tmp_path / "texts.json"),
                        "--cases", ",".join(RANDOM_CASES), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    live = json.loads(out.read_text(encoding="utf-8"))
    assert set(live["cases"]) == set(RANDOM_CASES)
    for name, case in live["cases"].items():
        tk = Tokenizer.from_gguf_metadata(meta_for(name, smol, default_minilm), name)
        bad = [t for t, want in zip(texts, case["ids"]) if tk.encode(t, parse_special=False) != want]
        assert not bad, f"{name}: {len(bad)} of {len(texts)} random texts differ from llama.cpp, e.g. {bad[0]!r}"
