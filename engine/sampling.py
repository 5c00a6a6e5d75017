"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.0        # 0 -> greedy
    top_k: int = 0                  # 0 -> off
    top_p: float = 1.0              # 1 -> off
    repeat_penalty: float = 1.0     # 1 -> off (llama.cpp style: divide positive logits, multiply negative)
    repeat_window: int = 64         # how many recent tokens the penalty looks at
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repeat_penalty > 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.p
        logits = np.asarray(logits, np.float64)
        if p.repeat_penalty != 1.0 and history:
            recent = np.unique(np.asarray(history[-p.repeat_window:], np.int64))
            lv = logits[recent]
            logits = logits.copy()
            logits[recent] = np.where(lv > 0, lv / p.repeat_penalty, lv * p.repeat_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        z = logits / p.temperature
        if p.top_k and p.top_k < z.size:
            kth = np.partition(z, -p.top_k)[-p.top_k]
            z = np.where(z >= kth, z, -np.inf)
        z = z - z.max()
        probs = np.exp(z)
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]   # smallest set reaching top_p
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(probs.size, p=probs))
