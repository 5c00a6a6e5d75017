"""The Python API of SPEC.md section 7: `engine.load(...)` and the model it returns.

    m = engine.load(wbits=4)                 # default SmolLM2, fetched and packed on first use
    for piece in m.stream("Hello", max_tokens=20): print(piece, end="")
    r = m.generate("Hello", max_tokens=20); r.text, r.ids, r.decode_tok_s
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from engine.decoder import ContextOverflow
from engine.fast_decode import FastDecoder
from engine.model_store import load_packed_model
from engine.sampling import Sampler, SamplingParams, TokenLogprob
from loader.tokenizer import Tokenizer
from runtime.select import select_backend


@dataclass
class Generation:
    ids: list[int]                      # generated ids only
    text: str
    prompt_tokens: int
    generated_tokens: int
    prompt_tok_s: float
    decode_tok_s: float
    ttft_s: float
    stop_reason: str                    # "eos" | "max_tokens" | "context" | "interrupted"
    stats: dict = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None     # one per generated id when asked for


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


class Model:
    """A loaded decoder. Not thread-safe: one generation at a time."""

    def __init__(self, packed, backend, *, wbits: int, abits: int, agroup, context: int | None = None):
        self.packed, self.backend = packed, backend
        self.config = packed.config
        self.tokenizer = Tokenizer.from_json(packed.tokenizer_json, chat_template=self.config.chat_template,
                                             bos_id=self.config.bos_id, eos_ids=self.config.eos_ids)
        self.wbits, self.abits = wbits, abits
        self.decoder = FastDecoder(packed, backend, wbits_run=None if wbits == 16 else wbits, abits=abits,
                               agroup=agroup, context=context)
        self.device = backend.name
        self.weight_bytes = packed.weight_bytes
        self.prefix_cache = None        # an engine.prefix_cache.PrefixCache to reuse prompt KV rows

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- text -----------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special=self.tokenizer.bos_id is not None)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def chat_prompt(self, text: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}])

    # ---- compute --------------------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """Full prefill of `ids` with a fresh cache: float32 (len(ids), vocab)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("logits() needs at least one token id")
        cache = self.decoder.new_cache()
        try:
            return np.asarray(self.decoder.forward(ids, cache, all_logits=True), np.float32)
        finally:
            cache.close()

    def _prompt_ids(self, prompt_or_ids, chat: bool, truncate: bool, max_tokens: int) -> list[int]:
        if isinstance(prompt_or_ids, str):
            text = self.chat_prompt(prompt_or_ids) if chat else prompt_or_ids
            ids = self.tokenize(text)
        else:
            ids = [int(i) for i in prompt_or_ids]
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        ctx = self.decoder.context
        if len(ids) >= ctx:
            if not truncate:
                raise ContextOverflow(f"the prompt has {len(ids)} tokens but the context holds {ctx}; "
                                      f"shorten it or ask for truncation (--truncate)")
            ids = ids[-max(1, ctx - max(1, min(max_tokens, ctx // 2))):]
        return ids

    def stream(self, prompt_or_ids, *, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repeat_penalty: float = 1.0, seed: int | None = None,
               chat: bool = False, truncate: bool = False,
               min_p: float = 0.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               logprobs: int | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are produced. The finished Generation is `self.last`.
        logprobs: None, or how many alternatives to list with each generated token's logprob."""
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, repeat_penalty, seed=seed, min_p=min_p,
                                         presence_penalty=presence_penalty,
                                         frequency_penalty=frequency_penalty))
        ids = self._prompt_ids(prompt_or_ids, chat, truncate, max_tokens)
        eos = set(self.tokenizer.eos_ids)
        dec = self.tokenizer.stream_decoder(skip_special=True)
        if self.prefix_cache is not None:
            cache, reused = self.prefix_cache.acquire(ids)
        else:
            cache, reused = self.decoder.new_cache(), 0
        out: list[int] = []
        lps: list[TokenLogprob] | None = None if logprobs is None else []
        reason = "max_tokens"
        t0 = time.perf_counter()
        t_first = t_prefill = None
        try:
            if max_tokens == 0:
                reason = "max_tokens"
            else:
                logits = self.decoder.forward(ids[reused:], cache)
                t_prefill = time.perf_counter()
                history = list(ids)
                while True:
                    tok, lp = sampler.step(logits, history, logprobs)
                    if t_first is None:
                        t_first = time.perf_counter()
                    if tok in eos:
                        reason = "eos"
                        break
                    out.append(tok)
                    if lps is not None:
                        lps.append(lp)
                    history.append(tok)
                    piece = dec.push(tok)
                    if piece:
                        yield piece
                    if len(out) >= max_tokens:
                        break
                    if cache.n >= cache.T:
                        reason = "context"
                        break
                    logits = self.decoder.forward([tok], cache)
            tail = dec.flush()
            if tail:
                yield tail
        except KeyboardInterrupt:
            reason = "interrupted"
        finally:
            if self.prefix_cache is not None:       # it keeps the prompt's rows (prefill rows only)
                self.prefix_cache.release(cache, ids)
            else:
                cache.close()
            t_end = time.perf_counter()
            prefill_s = (t_prefill - t0) if t_prefill else 0.0
            n_decode = max(len(out) - 1, 0)        # the first token comes from the prefill logits
            decode_s = (t_end - t_first) if t_first else 0.0
            self.last = Generation(
                ids=out, text=self.tokenizer.decode(out, skip_special=True), prompt_tokens=len(ids),
                generated_tokens=len(out),
                prompt_tok_s=len(ids) / prefill_s if prefill_s > 0 else 0.0,
                decode_tok_s=n_decode / decode_s if decode_s > 0 and n_decode else 0.0,
                ttft_s=(t_first - t0) if t_first else 0.0, stop_reason=reason,
                stats={"device": self.device, "wbits": self.wbits, "abits": self.abits,
                       "weight_bytes": self.weight_bytes, "peak_rss_bytes": peak_rss_bytes(),
                       "prefix_reused": reused}, logprobs=lps)

    def generate(self, prompt_or_ids, *, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repeat_penalty: float = 1.0, seed: int | None = None,
                 chat: bool = False, truncate: bool = False, **sampling) -> Generation:
        """Run stream() to the end; `sampling`: its min_p, presence_penalty, frequency_penalty, logprobs."""
        for _ in self.stream(prompt_or_ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, repeat_penalty=repeat_penalty, seed=seed, chat=chat,
                             truncate=truncate, **sampling):
            pass
        return self.last


def load(path=None, *, wbits: int = 4, abits: int = 16, group: int | None = None, agroup=None,
         device: str = "auto", threads: int | None = None, context: int | None = None,
         progress: bool = True) -> Model:
    """Load a decoder: path None (default SmolLM2), a GGUF file, an HF directory or a packed directory.

    group None: the source's block size where it maps exactly (32), else 128. agroup None: = group;
    "token": one activation scale per token (activations are then smoothed offline).
    """
    packed, wbits_eff = load_packed_model(path, wbits=wbits, abits=abits, group=group, agroup=agroup,
                                          progress=progress)
    backend = select_backend(device, threads)
    try:
        return Model(packed, backend, wbits=wbits_eff, abits=abits, agroup=agroup, context=context)
    except BaseException:
        backend.close()
        raise
