"""A prefix cache: a prompt that starts with the tokens of an earlier one reuses their KV rows.

A KVCache (engine/decoder.py) never reads rows past `cache.n`, so a kept cache whose first rows hold
the keys and values of tokens t0..tk-1 serves any prompt starting with those tokens: set n to the
length of the common prefix and prefill only the rest. A shared system prompt, or the earlier turns of
a chat, then costs nothing after the first request.

    pc = PrefixCache(model.decoder.new_cache, capacity=4)
    cache, reused = pc.acquire(ids)          # cache.n == reused; prefill ids[reused:]
    ...                                      # generate
    pc.release(cache, ids)                   # keep it for later prompts (LRU beyond capacity: closed)

Why only prompt rows are kept, and why at least two tokens are always prefilled: the backends compute
a row identically whatever the number M >= 2 of rows in the call (measured bit-exact on the CPU for
SmolLM2), but take another kernel at M = 1 (a decode step), whose logits differ in the last bits (2e-3
on SmolLM2's logits). Keeping only rows that came from a prefill of M >= 2, and prefilling at least two
tokens, makes a hit give exactly the logits a fresh prefill gives: the cache never changes an output.
A prompt of one token is never served from the cache.

Memory is bounded: at most `capacity` caches are kept (each one the KV cache of a full context; host
caches only map the pages that were written); the least recently used one is closed, or, when a
request needs a fresh cache and the pool is full, its memory is reused. Not thread-safe: the caller
(one model worker) owns it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, new_cache: Callable[[], object], capacity: int = 4):
        if capacity < 1:
            raise ValueError(f"the prefix cache needs a capacity of at least 1, got {capacity}")
        self.new_cache, self.capacity = new_cache, int(capacity)
        self._pool: OrderedDict[int, tuple[object, tuple[int, ...]]] = OrderedDict()   # oldest first
        self._key = 0
        self.hits = 0               # acquires that reused at least one row
        self.reused_tokens = 0      # rows reused in all

    def __len__(self) -> int:
        return len(self._pool)

    def acquire(self, ids) -> tuple[object, int]:
        """A cache for prompt `ids` (the caller owns it until release) and how many leading ids its
        rows already hold; cache.n is set to that number."""
        ids = [int(i) for i in ids]
        best, best_n = None, 0
        for key, (_, toks) in self._pool.items():
            n = common_prefix(toks, ids)
            if n > best_n:
                best, best_n = key, n
        usable = min(best_n, len(ids) - 2)          # leave at least two tokens to prefill (see above)
        if best is not None and usable > 0:
            cache, _ = self._pool.pop(best)
            cache.n = usable
            self.hits += 1
            self.reused_tokens += usable
            return cache, usable
        if len(self._pool) >= self.capacity:         # full: the oldest one's memory serves this prompt
            _, (cache, _) = self._pool.popitem(last=False)
        else:
            cache = self.new_cache()
        cache.n = 0
        return cache, 0

    def release(self, cache, tokens) -> None:
        """Give back a cache whose first rows hold the prefill of `tokens` (rows past cache.n, and
        tokens past it, are not trusted). The least recently used caches beyond capacity are closed."""
        n = min(len(tokens), int(cache.n))
        if n < 2:
            cache.close()
            return
        self._key += 1
        self._pool[self._key] = (cache, tuple(int(t) for t in tokens[:n]))
        while len(self._pool) > self.capacity:
            _, (old, _) = self._pool.popitem(last=False)
            old.close()

    def clear(self) -> None:
        while self._pool:
            _, (cache, _) = self._pool.popitem(last=False)
            cache.close()

    close = clear
