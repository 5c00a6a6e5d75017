"""Vocabulary cases for the tokenizer-vs-llama.cpp tests: GGUF tokenizer metadata of every kind anybit
builds, derived from models the tests already have, and the texts to tokenize.

llama.cpp's own ggml-vocab-*.gguf test files are not available here, so equivalent ones are made:
- `bpe_meta(smol, pre)`: SmolLM2's byte-level BPE vocabulary under any `tokenizer.ggml.pre` name;
- `spm_meta(smol, ...)`: a SentencePiece vocabulary made from SmolLM2's (each byte-level entry decoded
  to text, spaces as ▁, scores by rank, every character of an entry an entry too as SentencePiece
  guarantees, the 256 `<0xNN>` byte tokens); with `space_prefix=False` and user-defined whitespace
  tokens it has the shape of Gemma's files;
- `gemma_meta(path, as_llama2)`: the Gemma 3 file's own vocabulary, or the same with llama.cpp's
  SentencePiece default (space prefix) as a Llama-2 style file would have;
- `bert_meta(tokenizer_json)`: MiniLM's WordPiece vocabulary written the way llama.cpp's converter writes
  BERT vocabularies (▁ before word-initial pieces, `##` dropped).

`write_vocab_gguf` writes such metadata into a GGUF llama.cpp can open with vocab_only=True. This module
needs only numpy and gguf, so that both anybit's environment and llama.cpp's can import it.
"""
from __future__ import annotations

import json
from pathlib import Path

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6

TEXTS = [
    "Hello world! How are you doing today?",
    "  two leading spaces, trailing three   ",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines",
    "whitespace runs:     five,          ten,\t\t\ttabs \n \n mixed",
    "digits 1 12 123 1234 12345 1234567890 3.14159 1,000,000 0x1F 2024-01-31",
    "日本語のテキストと中文和한국어 混合 mixed 漢字",
    "emoji 🎉🚀 family 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "code: def f(x):\n    return x**2 + 12345  # comment\n\tif a != b: pass",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }  // C++ <vector>",
    "ünïcödé façade naïve — “quotes” … café Ångström Øresund",
    "combining: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ",
    "Ελληνικά кириллица العربية עברית हिन्दी ไทย",
    "'s 're 've 'll 'd 'm 't I'm You'RE DON'T can't",
    "punctuation!!! ??? ... --- *** ((())) [[[ ]]] {{}} <<>> @@ ## $$ %% ^^ && ||",
    "URL https://example.com/a/b?c=d&e=f#g and mail a.b@c.de",
    "nbsp\u00a0here, ideographic\u3000space, thin\u2009space",
    "MiXeD CaSe WORDS and ALLCAPS and lowercase",
    "",
    " ",
    "\n",
    "a",
    "  \n  ",
    "The quick brown fox jumps over the lazy dog. " * 3,
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over pieces that stress pre-tokenizers: whitespace runs next to digits and
    punctuation, contractions, accents (composed and not), CJK, Hangul, Thai, emoji, odd spaces."""
    import random
    rng = random.Random(seed)
    alphabet = (list("abcdeXYZ 0123456789.,!?-_(){}<>/\\$+=^~|`") +
                [" ", "  ", "\n", "\t", "\r\n", "'", "'s", "'LL", "é", "ß", "ñ", "Ö", "日", "本", "한", "語", "🎉",
                 "👍🏽", "\u00a0", "ä", "e\u0301", "ก", "ि", "ж", "Ω", "…", "。", "，", "\u200b", "1000", " 12",
                 "ﬁ", "Ⅻ", "½", "²"])
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def read_meta(path) -> dict:
    """The tokenizer.* metadata of a GGUF file as plain Python values (anybit's reader when importable:
    gguf's takes most of a minute on a 262k-entry vocabulary)."""
    try:
        from loader.gguf_reader import read_gguf_metadata
        meta = read_gguf_metadata(path)
    except ImportError:
        from gguf import GGUFReader
        r = GGUFReader(str(path))
        meta = {k: f.contents() for k, f in r.fields.items()}
    return {k: (list(v) if isinstance(v, (list, tuple)) or hasattr(v, "tolist") else v)
            for k, v in meta.items() if k.startswith("tokenizer.")}


def bpe_meta(smol: dict, pre: str) -> dict:
    m = {k: v for k, v in smol.items() if k != "tokenizer.chat_template"}
    m["tokenizer.ggml.pre"] = pre
    m.pop("tokenizer.ggml.add_bos_token", None)
    return m


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, symbol -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


def spm_meta(smol: dict, *, space_prefix: bool = True) -> dict:
    dec = _byte_decoder()
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    pieces: list[str] = []
    seen = set(tokens)
    for t, ty in zip(smol["tokenizer.ggml.tokens"], smol["tokenizer.ggml.token_type"]):
        if ty != NORMAL:
            continue
        try:
            text = bytes(dec[c] for c in t).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        piece = text.replace(" ", SPACE)
        if piece and piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    # every character of every piece is a piece (SentencePiece builds pieces from characters)
    chars = sorted({c for p in pieces for c in p} - seen)
    user = []
    if not space_prefix:
        # Gemma's shape: runs of newlines and of spaces are user-defined tokens, not pieces
        user = ["\n" * k for k in range(1, 8)] + [" " * k for k in range(2, 9)]
        pieces = [p for p in pieces if p not in user]
        chars = [c for c in chars if c not in user]
    all_pieces = pieces + chars
    tokens += user + all_pieces
    types += [USER_DEFINED] * len(user) + [NORMAL] * len(all_pieces)
    n_fixed = 3 + 256
    scores = [0.0] * n_fixed + [0.0] * len(user) + [-float(i) for i in range(len(all_pieces))]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_space_prefix": space_prefix}


def gemma_meta(path, *, as_llama2: bool = False) -> dict:
    m = {k: v for k, v in read_meta(path).items() if k != "tokenizer.chat_template"}
    if as_llama2:
        m["tokenizer.ggml.add_space_prefix"] = True
    return m


def bert_meta(tokenizer_json: str) -> dict:
    tj = json.loads(tokenizer_json)
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["content"] for a in tj.get("added_tokens", []) if a.get("special")}

    def phantom(t):
        if t.startswith("[") and t.endswith("]"):
            return t
        if t.startswith("##"):
            return t[2:]
        return SPACE + t
    ids = {t: i for i, t in enumerate(tokens)}
    return {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": [phantom(t) for t in tokens],
            "tokenizer.ggml.token_type": [CONTROL if t in special else NORMAL for t in tokens],
            "tokenizer.ggml.unknown_token_id": ids["[UNK]"], "tokenizer.ggml.cls_token_id": ids["[CLS]"],
            "tokenizer.ggml.seperator_token_id": ids["[SEP]"], "tokenizer.ggml.padding_token_id": ids["[PAD]"],
            "tokenizer.ggml.mask_token_id": ids["[MASK]"]}


def write_vocab_gguf(meta: dict, path) -> Path:
    """A GGUF with `meta` and the few llama hyperparameters llama.cpp reads before the vocabulary
    (no tensors: open it with vocab_only=True)."""
    import gguf
    path = Path(path)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    T = gguf.GGUFValueType
    for k, v in meta.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif k == "tokenizer.ggml.scores":
            w.add_key_value(k, [float(x) for x in v], T.ARRAY, sub_type=T.FLOAT32)
        elif k == "tokenizer.ggml.token_type":
            w.add_key_value(k, [int(x) for x in v], T.ARRAY, sub_type=T.INT32)
        elif isinstance(v, list):
            w.add_array(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
