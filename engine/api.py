"""The Python API of SPEC.md section 7: `engine.load(...)` and the model it returns.

    m = engine.load(wbits=4)                 # default SmolLM2, fetched and packed on first use
    for piece in m.stream("Hello", max_tokens=20): print(piece, end="")
    r = m.generate("Hello", max_tokens=20); r.text, r.ids, r.decode_tok_s
    r = m.chat([{"role": "user", "content": "Hi"}], stop=["\n\n"])   # multi-turn: the KV cache is kept
"""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from engine.decoder import ContextOverflow, Decoder
from engine.model_store import load_packed_model
from engine.sampling import Sampler, SamplingParams, TokenLogprob
from engine.stop_text import StopText
from loader.precision import Q8, check_abits
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
    stop_reason: str                    # "eos" | "stop" | "max_tokens" | "context" | "interrupted"
    stats: dict = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None     # one per generated id when asked for


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        return bool(ctypes.CDLL(None).mallopt(param, int(value)))
    except (OSError, AttributeError):
        return False


def fixed_heap_threshold(nbytes: int = 1 << 20) -> bool:
    """For loading: glibc's malloc raises its mmap threshold to the largest block freed (up to 32 MB),
    so the tens-of-MB temporaries of preparing weights land in the heap afterwards and their holes,
    between tiles that live on, stay resident: measured 70 MB of the 1.4 GB of an 8-layer 7B-shaped Q5_0
    model. A fixed threshold gives every block over `nbytes` a mapping of its own, returned when freed.
    Returns whether it was set (False off glibc)."""
    return _mallopt(-3, nbytes)                             # M_MMAP_THRESHOLD


def steady_heap() -> bool:
    """After loading: blocks up to 32 MB from the heap again, kept when freed (trim above 64 MB). Every
    step allocates and frees its logits and temporaries (1.5 MB of logits for 8 rows of a 49k
    vocabulary); with the loading threshold each was a fresh mapping whose pages faulted in at every
    step: 8% of a batched decode step on SmolLM2 (measured 13.9 vs 12.8 ms)."""
    return _mallopt(-3, 32 << 20) and _mallopt(-1, 64 << 20)   # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


class Model:
    """A loaded decoder. Not thread-safe: one generation at a time."""

    def __init__(self, packed, backend, *, wbits: int | str, abits: int, agroup, context: int | None = None):
        self.packed, self.backend = packed, backend
        self.config = packed.config
        self.tokenizer = Tokenizer.from_json(packed.tokenizer_json, chat_template=self.config.chat_template,
                                             bos_id=self.config.bos_id, eos_ids=self.config.eos_ids)
        self.wbits, self.abits = wbits, abits
        # 16 and "source" run every weight at the bits it is stored with (no nested planes dropped)
        self.decoder = Decoder(packed, backend, wbits_run=None if wbits in (16, "source") else wbits, abits=abits,
                               agroup=agroup, context=context)
        self.device = backend.name
        self.weight_bytes = packed.weight_bytes
        self._chat_cache = None             # the conversation's KV cache, kept between chat turns
        self._chat_ids: list[int] = []      # the ids whose keys and values it holds
        self.prefix_cache = None        # an engine.prefix_cache.PrefixCache to reuse prompt KV rows

    # ---- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        self.reset_chat()
        self.decoder.close()
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
            ids = (self.tokenizer.encode_chat([{"role": "user", "content": prompt_or_ids}]) if chat
                   else self.tokenize(prompt_or_ids))
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
               chat: bool = False, truncate: bool = False, stop=None,
               min_p: float = 0.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               logprobs: int | None = None, _keep_cache: bool = False) -> Iterator[str]:
        """Yield text pieces as tokens are produced. The finished Generation is `self.last`.

        stop: strings that end the generation where they appear; they are not emitted (nor in .text).
        logprobs: None, or how many alternatives to list with each generated token's logprob.
        _keep_cache (stream_chat): start from the conversation's KV cache and leave it filled; otherwise
        a prefix cache (self.prefix_cache, the server's) lends a cache whose rows may already hold the
        prompt's start."""
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        stops = StopText(stop)
        sampler = Sampler(SamplingParams(temperature, top_k, top_p, repeat_penalty, seed=seed, min_p=min_p,
                                         presence_penalty=presence_penalty,
                                         frequency_penalty=frequency_penalty))
        ids = self._prompt_ids(prompt_or_ids, chat, truncate, max_tokens)
        eos = set(self.tokenizer.eos_ids)
        dec = self.tokenizer.stream_decoder(skip_special=True)
        pooled = self.prefix_cache is not None and not _keep_cache
        if _keep_cache:
            cache, start = self._chat_cache_for(ids)
        elif pooled:
            cache, start = self.prefix_cache.acquire(ids)
        else:
            cache, start = self.decoder.new_cache(), 0
        fed = list(ids[:start])                # ids whose keys and values the cache holds
        out: list[int] = []
        emitted: list[str] = []
        lps: list[TokenLogprob] | None = None if logprobs is None else []
        reason = "max_tokens"
        t0 = time.perf_counter()
        t_first = t_prefill = None
        try:
            if max_tokens == 0:
                reason = "max_tokens"
            else:
                logits = self.decoder.forward(ids[start:], cache)
                fed = list(ids)
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
                    piece = stops.push(dec.push(tok))
                    if piece:
                        emitted.append(piece)
                        yield piece
                    if stops.hit is not None:
                        reason = "stop"
                        break
                    if len(out) >= max_tokens:
                        break
                    if cache.n >= cache.T:
                        reason = "context"
                        break
                    logits = self.decoder.forward([tok], cache)
                    fed.append(tok)
            tail = stops.push(dec.flush()) + stops.flush()
            if tail:
                emitted.append(tail)
                yield tail
        except KeyboardInterrupt:
            reason = "interrupted"
        finally:
            if _keep_cache:
                self._chat_ids = fed[:cache.n]
            elif pooled:                            # it keeps the prompt's rows (prefill rows only)
                self.prefix_cache.release(cache, ids)
            else:
                cache.close()
            t_end = time.perf_counter()
            prefill_s = (t_prefill - t0) if t_prefill else 0.0
            n_decode = max(len(out) - 1, 0)        # the first token comes from the prefill logits
            decode_s = (t_end - t_first) if t_first else 0.0
            stats = {"device": self.device, "wbits": self.wbits, "abits": self.abits,
                     "weight_bytes": self.weight_bytes, "peak_rss_bytes": peak_rss_bytes()}
            if chat or _keep_cache:
                stats["chat_template"] = self.tokenizer.template_source
            if _keep_cache:
                stats["cached_prompt_tokens"] = start
            if pooled:
                stats["prefix_reused"] = start
            self.last = Generation(
                ids=out, text="".join(emitted) if stops.stops else self.tokenizer.decode(out, skip_special=True),
                prompt_tokens=len(ids), generated_tokens=len(out),
                prompt_tok_s=(len(ids) - start) / prefill_s if prefill_s > 0 else 0.0,
                decode_tok_s=n_decode / decode_s if decode_s > 0 and n_decode else 0.0,
                ttft_s=(t_first - t0) if t_first else 0.0, stop_reason=reason, stats=stats, logprobs=lps)

    def generate(self, prompt_or_ids, *, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, repeat_penalty: float = 1.0, seed: int | None = None,
                 chat: bool = False, truncate: bool = False, stop=None, **sampling) -> Generation:
        """Run stream() to the end; `sampling`: its min_p, presence_penalty, frequency_penalty, logprobs."""
        for _ in self.stream(prompt_or_ids, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, repeat_penalty=repeat_penalty, seed=seed, chat=chat,
                             truncate=truncate, stop=stop, **sampling):
            pass
        return self.last

    # ---- multi-turn chat ------------------------------------------------------------------------
    def stream_chat(self, messages, **kw) -> Iterator[str]:
        """Stream the reply to a conversation ([{"role", "content"}, ...], rendered with the model's chat
        template). The KV cache stays between calls: the longest start of the new prompt that it already
        holds (usually every earlier turn) is not computed again. Keyword arguments as for stream()."""
        if "chat" in kw:
            raise TypeError("stream_chat() takes messages; chat= is for stream()")
        ids = self.tokenizer.encode_chat(messages)
        yield from self.stream(ids, _keep_cache=True, **kw)

    def chat(self, messages, **kw) -> Generation:
        for _ in self.stream_chat(messages, **kw):
            pass
        return self.last

    def reset_chat(self) -> None:
        """Forget the conversation's KV cache (the next chat turn computes its whole prompt)."""
        if self._chat_cache is not None:
            self._chat_cache.close()
        self._chat_cache, self._chat_ids = None, []

    def _chat_cache_for(self, ids):
        """The conversation's cache, cut back to the longest start of `ids` it holds, and that length
        (at most len(ids) - 1: the last prompt token is computed again for its logits)."""
        if self._chat_cache is None:
            self._chat_cache, self._chat_ids = self.decoder.new_cache(), []
        cache, held = self._chat_cache, self._chat_ids
        n = min(len(held), len(ids) - 1, cache.n)
        p = 0
        while p < n and held[p] == ids[p]:
            p += 1
        cache.n = p                      # rows past n are never read; the next forward overwrites them
        self._chat_ids = held[:p]
        return cache, p


Q8_CPU_ONLY = ("abits 'q8' (llama.cpp's 8-bit activation rounding) runs on the CPU only; the {} backend has no "
               "kernel for it (use device 'cpu')")


def load(path=None, *, wbits: int | str = 4, abits: int = 16, group: int | None = None, agroup=None,
         device: str = "auto", threads: int | None = None, context: int | None = None,
         progress: bool = True) -> Model:
    """Load a decoder: path None (default SmolLM2), a GGUF file, an HF directory or a packed directory.

    wbits: 1..8, 16 (float weights) or "source": each tensor at its source type's own bits, as
    `python -m tools.pack --wbits source` packs it (GGUF Q5_0 at 5, Q4_K at 4, Q6_K at 6, Q8_0 at 8,
    float tensors at 8); a packed directory then runs at the bits it holds.

    group None: the source's block size where it maps exactly (32), else 128. agroup None: = group;
    "token": one activation scale per token (activations are then smoothed offline).

    abits "q8" (CPU only): each linear's input is rounded as llama.cpp's CPU dot products round it, to
    8 bits per 32 lanes (Q8_0) or per 256 (Q8_K) as its weight's GGUF type pairs with
    (runtime/act_q8.py), then multiplied exactly; the weights are not changed. agroup must stay None.
    """
    abits = check_abits(abits)
    if abits == Q8 and agroup is not None:
        raise ValueError(f"agroup does not apply to abits 'q8' (its blocks follow each weight's source type), "
                         f"got agroup {agroup!r}")
    if abits == Q8 and device == "cuda":
        raise ValueError(Q8_CPU_ONLY.format("cuda"))
    fixed_heap_threshold()
    packed, wbits_eff = load_packed_model(path, wbits=wbits, abits=abits, group=group, agroup=agroup,
                                          progress=progress)
    backend = select_backend(device, threads)
    if abits == Q8 and backend.name not in ("cpu", "numpy"):
        backend.close()
        raise ValueError(Q8_CPU_ONLY.format(backend.name))
    try:
        return Model(packed, backend, wbits=wbits_eff, abits=abits, agroup=agroup, context=context)
    except BaseException:
        backend.close()
        raise
    finally:
        steady_heap()
