"""A tokenizer.json (for the `tokenizers` library) from a GGUF file's tokenizer metadata.

Three vocabulary kinds, each built to give the ids llama.cpp gives (tests/test_tokenizer_llama.py checks
that against llama.cpp itself):

- `gpt2`: byte-level BPE, split first by the pre-tokenizer `tokenizer.ggml.pre` names (loader/tokenizer_pre).
- `llama`: SentencePiece BPE (Llama 2, Mistral, Gemma ...). llama.cpp merges, among adjacent pieces, the
  pair whose concatenation is the vocabulary entry with the highest score; a `tokenizers` BPE model does
  the same when its merge list holds every (left, right) split of every entry, ranked by the entry's
  score. Characters outside the vocabulary fall back to their `<0xNN>` byte tokens. Spaces become `▁`,
  and with `add_space_prefix` (llama.cpp's default for this kind; Gemma's files turn it off) each
  stretch of text between special tokens gets a leading `▁`.
- `bert`: WordPiece. The GGUF converter stores word-initial pieces as `▁piece` and continuations bare;
  this undoes that (`##` for continuations) and adds BERT's normalizer and [CLS] ... [SEP].

Control tokens (type 3) become special tokens; user-defined ones (type 4) are split out of the text
before anything else, as llama.cpp does even when it does not parse special tokens.
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from loader.errors import FormatError
from loader.tokenizer_pre import PRE_TOKENIZERS, lookup, pre_tokenizer

# tokenizer.ggml.token_type values (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined,
# 5 unused, 6 byte
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"        # ▁, SentencePiece's visible space


def _tokens_and_types(meta: dict, source: str):
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise FormatError(f"{source}: missing or malformed tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise FormatError(f"{source}: {len(types)} entries in tokenizer.ggml.token_type for {len(tokens)} tokens")
    return tokens, list(types)


def _token_id(meta: dict, key: str, n: int):
    v = meta.get(f"tokenizer.ggml.{key}")
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n else None


def _add_specials(tok: _HFTokenizer, tokens, types) -> None:
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    tok.add_special_tokens(control)
    tok.add_tokens(user)


def _post(tok: _HFTokenizer, tokens, first=None, last=None) -> None:
    """Wrap encodings in `first` ... `last` (ids or None) when special tokens are asked for."""
    if first is None and last is None:
        return
    parts, specials = ["$A"], []
    if first is not None:
        parts.insert(0, tokens[first])
        specials.append((tokens[first], first))
    if last is not None:
        parts.append(tokens[last])
        if last != first:
            specials.append((tokens[last], last))
    tok.post_processor = processors.TemplateProcessing(single=" ".join(parts), special_tokens=specials)


def _flag(meta: dict, key: str, default: bool) -> bool:
    v = meta.get(f"tokenizer.ggml.{key}", default)
    return bool(v)


# ---- gpt2: byte-level BPE ------------------------------------------------------------------------

def _bpe(meta: dict, source: str) -> _HFTokenizer:
    tokens, types = _tokens_and_types(meta, source)
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise FormatError(f"{source}: missing tokenizer.ggml.merges")
    pt = lookup(meta.get("tokenizer.ggml.pre", "default"), source)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        # "left right": the separator is the first space after position 0 (as llama.cpp reads it)
        cut = m.find(" ", 1) if isinstance(m, str) else -1
        if cut < 0:
            raise FormatError(f"{source}: malformed BPE merge {m!r} in tokenizer.ggml.merges")
        pairs.append((m[:cut], m[cut + 1:]))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                         ignore_merges=pt.ignore_merges)
    except Exception as e:  # the Rust side rejects merges whose parts are not in the vocabulary
        raise FormatError(f"{source}: inconsistent BPE vocabulary/merges: {e}") from None
    tok = _HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizer(pt)
    tok.decoder = decoders.ByteLevel()
    _add_specials(tok, tokens, types)
    n = len(tokens)
    bos, eos = _token_id(meta, "bos_token_id", n), _token_id(meta, "eos_token_id", n)
    _post(tok, tokens, bos if _flag(meta, "add_bos_token", pt.add_bos) else None,
          eos if _flag(meta, "add_eos_token", False) else None)
    return tok


# ---- llama: SentencePiece BPE --------------------------------------------------------------------

def spm_merges(tokens, types, scores) -> list[tuple[str, str]]:
    """Every (left, right) split of every entry whose halves are entries too, best score first.

    Byte tokens are left out: `<0x41>` is a fallback id, not text the merges should build. Entries of
    equal score keep id order, a stable tie-break."""
    vocab = set(tokens)
    ranked = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == BYTE or len(t) < 2:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm(meta: dict, source: str) -> _HFTokenizer:
    tokens, types = _tokens_and_types(meta, source)
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        raise FormatError(f"{source}: a SentencePiece vocabulary needs tokenizer.ggml.scores, one per token")
    n = len(tokens)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk = _token_id(meta, "unknown_token_id", n)
    try:
        bpe = models.BPE(vocab=vocab, merges=spm_merges(tokens, types, scores), fuse_unk=True,
                         byte_fallback=True, unk_token=tokens[unk] if unk is not None else None)
    except Exception as e:
        raise FormatError(f"{source}: inconsistent SentencePiece vocabulary: {e}") from None
    tok = _HFTokenizer(bpe)
    space_prefix = _flag(meta, "add_space_prefix", True)
    # the normalizer runs on each stretch between special tokens, so the prefix goes where llama.cpp
    # puts it: at the start of the text and after every special token
    steps = ([normalizers.Prepend(SPACE)] if space_prefix else []) + [normalizers.Replace(" ", SPACE)]
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    _add_specials(tok, tokens, types)
    bos, eos = _token_id(meta, "bos_token_id", n), _token_id(meta, "eos_token_id", n)
    _post(tok, tokens, bos if _flag(meta, "add_bos_token", True) else None,
          eos if _flag(meta, "add_eos_token", False) else None)
    return tok


# ---- bert: WordPiece -----------------------------------------------------------------------------

def _bert_normalizer(lowercase: bool, strip_accents: bool):
    """llama.cpp's BERT text cleaning: control characters dropped, CJK ideographs isolated; stripping
    accents maps each character to the first of its canonical decomposition (so a Hangul syllable
    becomes its leading consonant) and drops every mark (Mn, Mc, Me); lower case last."""
    steps = [normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                        lowercase=False)]
    if strip_accents:
        # the 11172 precomposed syllables, 588 per leading consonant, in order
        steps += [normalizers.Replace(Regex(f"[{chr(0xAC00 + 588 * k)}-{chr(0xAC00 + 588 * k + 587)}]"),
                                      chr(0x1100 + k)) for k in range(19)]
        steps += [normalizers.NFD(), normalizers.Replace(Regex(r"\p{M}"), "")]
    if lowercase:
        steps.append(normalizers.Lowercase())
    return normalizers.Sequence(steps)


def _wpm(meta: dict, source: str) -> _HFTokenizer:
    tokens, types = _tokens_and_types(meta, source)
    vocab = {}
    for i, t in enumerate(tokens):
        if t.startswith(SPACE):
            word = t[1:]
        elif types[i] in (CONTROL, UNKNOWN, USER_DEFINED) or (t.startswith("[") and t.endswith("]")):
            word = t
        else:
            word = "##" + t
        if word and word != "##":
            vocab.setdefault(word, i)
    n = len(tokens)
    unk = _token_id(meta, "unknown_token_id", n)
    if unk is None:
        raise FormatError(f"{source}: a WordPiece vocabulary needs tokenizer.ggml.unknown_token_id")
    # no per-word length limit: llama.cpp has none
    tok = _HFTokenizer(models.WordPiece(vocab=vocab, unk_token=tokens[unk], max_input_chars_per_word=1 << 30))
    lower = _flag(meta, "normalizer.lowercase", True)
    tok.normalizer = _bert_normalizer(lower, _flag(meta, "normalizer.strip_accents", lower))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    _add_specials(tok, tokens, types)
    firsts = (_token_id(meta, "bos_token_id", n), _token_id(meta, "cls_token_id", n), vocab.get("[CLS]"))
    lasts = (_token_id(meta, "seperator_token_id", n), vocab.get("[SEP]"))
    first = next((i for i in firsts if i is not None), None)
    last = next((i for i in lasts if i is not None), None)
    _post(tok, tokens, first, last)         # llama.cpp adds both whenever special tokens are asked for
    return tok


BUILDERS = {"gpt2": _bpe, "llama": _spm, "bert": _wpm}


def adds_bos(meta: dict) -> bool:
    """Whether llama.cpp starts an encoding with BOS for this vocabulary (the file's flag, else the
    default of its kind and pre-tokenizer)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        pt = PRE_TOKENIZERS.get(meta.get("tokenizer.ggml.pre", "default"))
        default = pt.add_bos if pt else False
    else:
        default = kind in ("llama", "bert")
    return _flag(meta, "add_bos_token", default)


def tokenizer_from_gguf(meta: dict, source: str = "GGUF") -> _HFTokenizer:
    """A `tokenizers.Tokenizer` for the vocabulary described by GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in BUILDERS:
        raise FormatError(f"{source}: tokenizer.ggml.model {kind!r} is not supported "
                          f"(supported: {', '.join(BUILDERS)})")
    return BUILDERS[kind](meta, source)


def tokenizer_json_from_gguf(meta: dict, source: str = "GGUF") -> str:
    """The same as a tokenizer.json (text)."""
    return tokenizer_from_gguf(meta, source).to_str()
