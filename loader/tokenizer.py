"""Tokenizer: a thin wrapper over `tokenizers.Tokenizer`, built from a tokenizer.json or from GGUF metadata
(loader/tokenizer_gguf.py builds the latter for every GGUF vocabulary kind).

Also the chat template (loader/chat_template.py: the model's own, ChatML only for a model without one),
an incremental decoder that never splits a multi-byte UTF-8 character across two pieces, and the
BERT-style batch encoding the embedder needs (special tokens from the tokenizer's own post-processor,
truncation, no padding: the embedder builds its own mask).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from loader import chat_template as _chat
from loader.errors import FormatError
from loader.tokenizer_gguf import adds_bos, tokenizer_from_gguf, tokenizer_json_from_gguf

__all__ = ["Tokenizer", "StreamDecoder", "tokenizer_json_from_gguf"]

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


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, *, chat_template: str | None = None, bos_id: int | None = None,
                 eos_ids=(), bos_token: str | None = None, eos_token: str | None = None,
                 json_text: str | None = None):
        """bos_id: the BOS the model wants at the start of a prompt (None: none). bos_token/eos_token: the
        texts a chat template sees (default: those of bos_id and the first of eos_ids)."""
        self._json = json_text     # serialized on demand: a 262k-entry vocabulary takes seconds
        tok.no_padding()
        tok.no_truncation()      # the decoder must see the whole prompt; encode_for_encoder truncates
        self._tok = tok
        self.chat_template = chat_template
        self.bos_id = bos_id
        self.eos_ids = list(eos_ids)
        self.bos_token = bos_token if bos_token is not None else (
            tok.id_to_token(bos_id) or "" if bos_id is not None else "")
        self.eos_token = eos_token if eos_token is not None else (
            tok.id_to_token(self.eos_ids[0]) or "" if self.eos_ids else "")
        self._encoder_tok: dict[int, _HFTokenizer] = {}
        self.special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_json(cls, text: str, **kw) -> "Tokenizer":
        try:
            tok = _HFTokenizer.from_str(text)
        except Exception as e:
            raise FormatError(f"invalid tokenizer.json: {e}") from None
        return cls(tok, json_text=text, **kw)

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
        bos = meta.get("tokenizer.ggml.bos_token_id")
        bos = bos if isinstance(bos, int) and 0 <= bos < len(tokens) else None
        return cls(tokenizer_from_gguf(meta, source), chat_template=meta.get("tokenizer.chat_template"),
                             bos_id=bos if adds_bos(meta) else None, eos_ids=eos,
                             bos_token=tokens[bos] if bos is not None else "",
                             eos_token=tokens[eos[0]] if eos and 0 <= eos[0] < len(tokens) else "")

    @classmethod
    def from_source(cls, src) -> "Tokenizer":
        """From a `SourceModel` (its tokenizer JSON plus the config's template and special ids)."""
        c = src.config
        return cls.from_json(src.tokenizer_json, chat_template=c.chat_template, bos_id=c.bos_id, eos_ids=c.eos_ids)

    def to_json(self) -> str:
        if self._json is None:
            self._json = self._tok.to_str()
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
    def encode(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Ids of `text`. With parse_special, special-token strings in the text (e.g. "<|im_start|>") map to
        their ids; without, they are plain text (llama.cpp's `special=False`; user-defined tokens are
        still split out, as there). With add_special, the tokenizer's post-processor adds what the model
        wants (BOS, or [CLS]/[SEP])."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        self._tok.encode_special_tokens = not parse_special
        try:
            return self._tok.encode(text, add_special_tokens=add_special).ids
        finally:
            self._tok.encode_special_tokens = False

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
            tok = _HFTokenizer.from_str(self.to_json())
            tok.no_padding()
            tok.enable_truncation(max_length=max_len)
            self._encoder_tok[max_len] = tok
        return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=True)]

    # --- chat ---------------------------------------------------------------------------------
    @property
    def template_source(self) -> str:
        """Where the chat template comes from: "model", or "chatml-fallback" for a model without one."""
        return "model" if self.chat_template else "chatml-fallback"

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role", "content"}, ...]): the model's own template rendered
        with jinja2, or ChatML when the model has none (see template_source)."""
        return _chat.render(self.chat_template or _chat.CHATML, messages,
                            add_generation_prompt=add_generation_prompt, bos_token=self.bos_token,
                            eos_token=self.eos_token)

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Ids of the rendered conversation: special tokens parsed, and BOS added only where the
        template did not already write it (templates like Gemma's start with {{ bos_token }})."""
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt))
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids
