"""Tokenizer: the GGUF-built byte-level BPE against hand-checked merges and an independent BPE written
here, SmolLM2's known properties, ChatML, streaming decode, and the BERT WordPiece path."""
import json

import pytest

from loader.errors import FormatError
from loader.gguf_reader import read_gguf_metadata
from loader.tokenizer import Tokenizer, tokenizer_json_from_gguf
from tests.data_gen.tiny_models import CHAT_TEMPLATE, bert_tokenizer_json, byte_symbols, tiny_vocab

TEXTS = ["Hello world! How are you doing today?", "ünïcödé façade naïve — “quotes” …",
         "日本語のテキストと中文和한국어", "emoji 🎉🚀👩‍👩‍👧 flags 🇫🇷", "tabs\tand\nnewlines\r\n  spaces   ",
         "code: def f(x): return x**2 + 12345", "mixed 3.14159 and 1,000,000 and 0x1F",
         "Ελληνικά кириллица العربية עברית", "", " ", "'s 're 've 'll I'm"]


def tiny_meta(**over):
    tokens, types, merges = tiny_vocab()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 0,
            "tokenizer.chat_template": CHAT_TEMPLATE}
    meta.update(over)
    return meta


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer.from_gguf_metadata(tiny_meta())


@pytest.fixture(scope="module")
def smol_meta(default_gguf):
    return read_gguf_metadata(default_gguf)


@pytest.fixture(scope="module")
def smol(smol_meta):
    return Tokenizer.from_gguf_metadata(smol_meta)


def toks(tk, text):
    return [tk.id_to_token(i) for i in tk.encode(text)]


# ---- hand-checked merges on the tiny vocabulary -------------------------------------------------

def test_tiny_merges_by_hand(tiny):
    # merges by rank: "Ġ t" 0, "h e" 1, "Ġt he" 2, "l l" 3, "Ġ w" 4, "o r" 5, "Ġw or" 6, "l d" 7,
    # "Ġwor ld" 8, "e ll" 9, "h ell" 10
    assert toks(tiny, " the") == ["Ġthe"]
    # h e l l o: "h e" (1) first, then "l l" (3); "e ll" and "h ell" no longer apply
    assert toks(tiny, "hello") == ["he", "ll", "o"]
    # Ġ w o r l d: "Ġ w" (4), "o r" (5), "Ġw or" (6), "l d" (7), "Ġwor ld" (8)
    assert toks(tiny, " world") == ["Ġworld"]
    assert toks(tiny, "ell") == ["ell"]                # "l l" (3), then "e ll" (9)
    assert toks(tiny, "hell") == ["he", "ll"]          # not h + ell: "h e" (1) outranks "l l" (3)
    # "smollm" isolates every digit before BPE, so the merges "1 2" and "Ġ 1" never apply ...
    assert toks(tiny, "12") == ["1", "2"] and toks(tiny, " 1") == ["Ġ", "1"]
    # ... while the plain GPT-2 pre-tokenizer keeps " 12" together and lets them apply
    gpt2 = Tokenizer.from_gguf_metadata(tiny_meta(**{"tokenizer.ggml.pre": "gpt-2"}))
    assert toks(gpt2, "12") == ["12"] and toks(gpt2, " 1") == ["Ġ1"]


def test_tiny_specials_and_ids(tiny):
    assert tiny.encode("<|im_start|>") == [1] and tiny.encode("<|im_end|>") == [2]
    assert tiny.special_ids == {0, 1, 2}
    assert tiny.vocab_size == len(tiny_vocab()[0])
    assert tiny.encode("x", add_special=True) == tiny.encode("x")     # add_bos_token absent: no BOS
    with_bos = Tokenizer.from_gguf_metadata(tiny_meta(**{"tokenizer.ggml.add_bos_token": True}))
    assert with_bos.encode("x", add_special=True) == [1] + tiny.encode("x")
    assert with_bos.bos_id == 1 and tiny.bos_id is None


def test_gguf_tokenizer_errors():
    with pytest.raises(FormatError, match="tokenizer.ggml.pre 'no-such-pre' is not a pre-tokenizer"):
        tokenizer_json_from_gguf(tiny_meta(**{"tokenizer.ggml.pre": "no-such-pre"}))
    with pytest.raises(FormatError, match="tokenizer.ggml.model 'rwkv' is not supported"):
        tokenizer_json_from_gguf(tiny_meta(**{"tokenizer.ggml.model": "rwkv"}))
    with pytest.raises(FormatError, match="tokenizer.ggml.scores"):
        tokenizer_json_from_gguf(tiny_meta(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(FormatError, match="inconsistent"):
        tokenizer_json_from_gguf(tiny_meta(**{"tokenizer.ggml.merges": ["x yz"]}))
    with pytest.raises(FormatError, match="malformed BPE merge"):
        tokenizer_json_from_gguf(tiny_meta(**{"tokenizer.ggml.merges": ["nospace"]}))
    with pytest.raises(FormatError, match="token_type"):
        tokenizer_json_from_gguf(tiny_meta(**{"tokenizer.ggml.token_type": [1]}))


def test_decode_checks_ids(tiny):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.decode([5, 10 ** 6])
    with pytest.raises(TypeError):
        tiny.encode(b"bytes")


# ---- chat template ------------------------------------------------------------------------------

def test_chatml(tiny):
    msgs = [{"role": "user", "content": "Hi"}]
    assert tiny.apply_chat_template(msgs) == ("<|im_start|>system\nYou are tiny.<|im_end|>\n"
                                              "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert tiny.apply_chat_template(sys_msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n")
    ids = tiny.encode(tiny.apply_chat_template(msgs))
    assert ids[0] == 1 and ids.count(2) == 2


def test_chat_template_any_jinja_and_chatml_fallback():
    tpl = "{{ bos_token }}{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}{% endfor %}"
    other = Tokenizer.from_gguf_metadata(tiny_meta(**{"tokenizer.chat_template": tpl}))
    assert other.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>[USER] x"
    assert other.template_source == "model"
    none = Tokenizer.from_json(bert_tokenizer_json())
    assert none.template_source == "chatml-fallback"
    assert none.apply_chat_template([{"role": "user", "content": "x"}]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n")


# ---- streaming ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_tiny(tiny, text):
    ids = tiny.encode(text)            # the tiny vocabulary splits multi-byte characters across tokens
    sd = tiny.stream_decoder()
    pieces = [sd.push(i) for i in ids] + [sd.flush()]
    assert "".join(pieces) == text == tiny.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


# ---- the real SmolLM2 vocabulary ----------------------------------------------------------------

def test_smol_known_properties(smol, smol_meta):
    tokens = smol_meta["tokenizer.ggml.tokens"]
    assert tokens[1] == "<|im_start|>" and tokens[2] == "<|im_end|>"
    assert smol.encode("<|im_start|>") == [1] and smol.encode("<|im_end|>") == [2]
    ids = smol.encode("12345")
    assert len(ids) == 5 and [smol.id_to_token(i) for i in ids] == list("12345")
    assert toks(smol, " hello") == ["Ġhello"]
    assert toks(smol, "x 2024") == ["x", "Ġ", "2", "0", "2", "4"]
    assert smol.vocab_size == 49152 and smol.eos_ids == [2] and smol.bos_id is None
    assert smol.special_ids == {i for i, t in enumerate(smol_meta["tokenizer.ggml.token_type"]) if t == 3}


@pytest.mark.parametrize("text", TEXTS)
def test_smol_roundtrip_and_stream(smol, text):
    ids = smol.encode(text)
    assert smol.decode(ids) == text
    sd = smol.stream_decoder()
    pieces = [sd.push(i) for i in ids] + [sd.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


def _reference_bpe(word: str, ranks: dict) -> list[str]:
    """Textbook BPE, written independently: merge the adjacent pair of lowest rank until none is left."""
    parts = list(word)
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best == 1 << 30:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def test_smol_matches_reference_bpe(smol, smol_meta):
    """Each pre-tokenized word of a varied text goes through the reference BPE over the GGUF merges;
    the concatenated tokens must equal the library's. (Pre-tokenization itself is checked by the
    known-property tests: digits one by one, GPT-2 words with their leading space.)"""
    ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(smol_meta["tokenizer.ggml.merges"])}
    vocab = set(smol_meta["tokenizer.ggml.tokens"])
    sym = byte_symbols()
    hf = json.loads(smol.to_json())
    assert [p["type"] for p in hf["pre_tokenizer"]["pretokenizers"]] == ["Split", "Split", "ByteLevel"]
    from tokenizers import Tokenizer as HF
    pre = HF.from_str(smol.to_json()).pre_tokenizer
    text = " ".join(TEXTS) + " The quick brown fox jumps over the lazy dog. Antidisestablishmentarianism!"
    ref = []
    for word, _span in pre.pre_tokenize_str(text):
        assert word == "".join(sym[b] for b in _raw_bytes(word, sym))   # byte-level symbols only
        pieces = _reference_bpe(word, ranks)
        assert all(p in vocab for p in pieces)
        ref += pieces
    assert toks(smol, text) == ref


def _raw_bytes(word, sym):
    inv = {s: b for b, s in enumerate(sym)}
    return [inv[c] for c in word]


def test_smol_chat_template(smol):
    got = smol.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert got == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                   "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")


# ---- WordPiece (BERT) ---------------------------------------------------------------------------

def test_tiny_wordpiece_no_padding_truncation():
    tk = Tokenizer.from_json(bert_tokenizer_json())       # the file enables padding/truncation to 16
    assert tk.encode("Hello world", add_special=True) == [2, 5, 6, 3]
    assert tk.encode("the cats") == [7, 9, 8]
    long = " ".join(["hello"] * 40)
    assert len(tk.encode(long)) == 40                      # no truncation on the plain path
    batch = tk.encode_for_encoder(["hello", long, "cat, the."], max_len=8)
    assert batch[0] == [2, 5, 3]                           # no padding
    assert batch[1] == [2] + [5] * 6 + [3]                 # truncated to 8, [SEP] kept
    assert batch[2] == [2, 9, 10, 7, 11, 3]
    assert tk.decode([2, 5, 6, 3], skip_special=True) == "hello world"


def test_minilm_wordpiece(default_minilm):
    tk = Tokenizer.from_file(default_minilm / "tokenizer.json")
    assert tk.token_to_id("[CLS]") == 101 and tk.token_to_id("[SEP]") == 102
    assert tk.encode("hello world", add_special=True) == [101, 7592, 2088, 102]
    out = tk.encode_for_encoder(["hello world", "word " * 300], max_len=256)
    assert out[0] == [101, 7592, 2088, 102]
    assert len(out[1]) == 256 and out[1][0] == 101 and out[1][-1] == 102


def test_from_file_errors(tmp_path):
    with pytest.raises(FormatError, match="cannot read tokenizer"):
        Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FormatError, match="invalid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
