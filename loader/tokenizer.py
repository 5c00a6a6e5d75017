"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer`, built from a tokenizer.json or from GGUF metadata.

Also the ChatML chat template (written out by hand: no jinja2), an incremental decoder that never
splits a multi-byte UTF-8 character across two pieces, and the BERT-style batch encoding the embedder
needs (special tokens from the tokenizer's own post-processor, truncation, no padding: the embedder
builds its own mask).
"""
from __future__ import annotations

import re
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from loader.errors import FormatError

# tokenizer.ggml.token_type values (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined,
# 5 unused, 6 byte
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> pre-tokenizer. SmolLM2 ("smollm") uses the StarCoder scheme: every digit is a
# piece of its own, then the GPT-2 byte-level regex (llama.cpp: "\p{N}" before the GPT-2 pattern; the
# SmolLM2 tokenizer.json: Sequence[Digits(individual_digits), ByteLevel(add_prefix_space=False)]).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder")
_GPT2 = ("default", "gpt2", "gpt-2")


def _pre_tokenizer(pre: str, source: str):
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise FormatError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported "
                      f"(supported: {', '.join(_DIGITS_THEN_GPT2 + _GPT2)})")


def tokenizer_json_from_gguf(meta: dict, source: str = "GGUF") -> str:
    """A tokenizer.json (text) for the byte-level BPE vocabulary described by GGUF metadata."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise FormatError(f"{source}: tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)")
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens or not isinstance(merges, list):
        raise FormatError(f"{source}: missing tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise FormatError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        # a merge is "left right"; the separator is the first space after position 0 (as llama.cpp reads it)
        cut = m.find(" ", 1) if isinstance(m, str) else -1
        if cut < 0:
            raise FormatError(f"{source}: malformed BPE merge {m!r}")
        pairs.append((m[:cut], m[cut + 1:]))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
    except Exception as e:  # the Rust side rejects merges whose parts are not in the vocabulary
        raise FormatError(f"{source}: inconsistent BPE vocabulary/merges: {e}") from None
    tok = _HFTokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), source)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens(special)
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", False) and isinstance(bos, int) and bos < len(tokens)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False) and isinstance(eos, int) and eos < len(tokens)
    if add_bos or add_eos:
        parts, specials = ["$A"], []
        if add_bos:
            parts.insert(0, tokens[bos])
            specials.append((tokens[bos], bos))
        if add_eos:
            parts.append(tokens[eos])
            specials.append((tokens[eos], eos))
        tok.post_processor = processors.TemplateProcessing(single=" ".join(parts), special_tokens=specials)
    return tok.to_str()


class StreamDecoder:
    """Turns ids arriving one at a time into text pieces, holding back bytes of an unfinished character.

    Decoding only the newest ids is wrong for byte-level BPE (a character's bytes may span tokens) and
    for WordPiece (spacing depends on the neighbour), so each step decodes a short window that starts
    at the last emitted boundary and emits the text beyond what that window decoded to before.
    """

    def __init__(self, tokenizer: "Tokenizer", skip_special: bool = False):
        self.tok, self.skip_special = tokenizer, skip_special
        self.ids: list[int] = []
        self.prefix = 0     # window start: ids before it are fully emitted
        self.read = 0       # ids before it are emitted (as far as the window text goes)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special=self.skip_special)
        text = self.tok.decode(self.ids[self.prefix:], skip_special=self.skip_special)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held back (an incomplete character decodes to U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special=self.skip_special)
        text = self.tok.decode(self.ids[self.prefix:], skip_special=self.skip_special)
        self.prefix = self.read = len(self.ids)
        return text[len(before):] if len(text) > len(before) else ""


_CHATML_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, *, chat_template: str | None = None, bos_id: int | None = None,
                 eos_ids=()):
        self._json = tok.to_str()
        tok.no_padding()
        tok.no_truncation()      # the decoder must see the whole prompt; encode_for_encoder truncates
        self._tok = tok
        self.chat_template = chat_template
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self._encoder_tok: dict[int, _HFTokenizer] = {}
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_json(cls, text: str, **kw) -> "Tokenizer":
        try:
            tok = _HFTokenizer.from_str(text)
        except Exception as e:
            raise FormatError(f"invalid tokenizer.json: {e}") from None
        return cls(tok, **kw)

    @classmethod
    def from_file(cls, path, **kw) -> "Tokenizer":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: cannot read tokenizer: {e}") from None
        return cls.from_json(text, **kw)

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str = "GGUF") -> "Tokenizer":
        tokens = meta.get("tokenizer.ggml.tokens") or []
        eos = []
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
            if isinstance(meta.get(k), int) and meta[k] not in eos:
                eos.append(meta[k])
        if "<|im_end|>" in tokens and tokens.index("<|im_end|>") not in eos:
            eos.append(tokens.index("<|im_end|>"))
        bos = meta.get("tokenizer.ggml.bos_token_id") if meta.get("tokenizer.ggml.add_bos_token") else None
        return cls.from_json(tokenizer_json_from_gguf(meta, source), chat_template=meta.get("tokenizer.chat_template"),
                             bos_id=bos, eos_ids=eos)

    @classmethod
    def from_source(cls, src) -> "Tokenizer":
        """From a `SourceModel` (its tokenizer JSON plus the config's template and special ids)."""
        c = src.config
        return cls.from_json(src.tokenizer_json, chat_template=c.chat_template, bos_id=c.bos_id, eos_ids=c.eos_ids)

    def to_json(self) -> str:
        return self._json

    # --- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    # --- text <-> ids -------------------------------------------------------------------------
    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Ids of `text`. Special-token strings in the text (e.g. "<|im_start|>") map to their ids.
        With add_special, the tokenizer's post-processor adds what the model wants (BOS, or [CLS]/[SEP])."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids, skip_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary (size {n})")
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def encode_for_encoder(self, texts, max_len: int) -> list[list[int]]:
        """BERT-style ids for each text: [CLS] ... [SEP] from the post-processor, at most max_len ids."""
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {max_len}")
        tok = self._encoder_tok.get(max_len)
        if tok is None:
            tok = _HFTokenizer.from_str(self._json)
            tok.no_padding()
            tok.enable_truncation(max_length=max_len)
            self._encoder_tok[max_len] = tok
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=True)]

    # --- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The ChatML prompt for `messages` ([{"role", "content"}, ...]), as SmolLM2's template writes it."""
        tpl = self.chat_template
        if not tpl or "<|im_start|>" not in tpl:
            raise FormatError("unsupported chat template" + ("" if tpl else " (the model has none)"))
        out = []
        msgs = list(messages)
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"a chat message must be a dict with str 'role' and 'content', got {m!r}")
        # the template's own default system prompt, used when the conversation does not start with one
        default = _CHATML_SYSTEM.search(tpl)
        if default and msgs and msgs[0]["role"] != "system":
            out.append(f"<|im_start|>system\n{default.group(1)}<|im_end|>\n")
        for m in msgs:
            out.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
        return "".join(out)
